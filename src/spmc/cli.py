"""The ``spmc`` command: ``run``, ``demo`` (the default), ``list``, and the reports ``table``, ``plot``, ``gradcam``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from spmc.attacks import ATTACKS, HOOKS, Attack, attack_kind
from spmc.cluster import RayOptions
from spmc.config import PRESET_DESCRIPTIONS, PRESETS, ConfigError, Experiment, resolve
from spmc.data import DATASETS, DataError
from spmc.defenses import DEFENSES
from spmc.guard import InvalidUpdateError
from spmc.models import MODELS
from spmc.plugins import plugin_origin
from spmc.simulation import RunResult, load_run_config, run_experiment
from spmc.sweep import SweepOutcome, load_grid, run_sweep

CLIENTS = {
    "plain": "plain SGD on the cross-entropy (spec §1.4)",
    "spmc": "SPMC self-purification: CE gradient projected away from the distillation gradient (spec §4)",
}

console = Console(stderr=False)
#: Errors and the interruption notice go to standard error, one line each (no wrapping).
err_console = Console(stderr=True, soft_wrap=True)
#: Expected failures and their exit status: bad input (configuration, data, run directory) 2; the environment
#: (I/O) or the run itself (every update rejected) 1. Each is one line; ``--verbose`` adds the traceback.
EXPECTED_ERRORS: tuple[tuple[type[BaseException], int], ...] = (
    (OSError, 1),
    (InvalidUpdateError, 1),
    (ConfigError, 2),
    (DataError, 2),  # also RunDirError and RunLockedError (spmc.store)
    (ValueError, 2),  # validation outside the configuration
)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_sets(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set: got {item!r}; expected KEY=VALUE, e.g. --set spmc_temperature=0.01")
        out[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return out


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        help="TOML configuration file (keys as in `spmc list --options`), or a run's own config.json (reruns it)",
    )
    p.add_argument("--preset", "-p", choices=sorted(PRESETS), help="start from a preset (see `spmc list`)")
    p.add_argument("--dataset", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data-dir", help="folder with the dataset files (default: $SPMC_DATA_DIR, Debian's fmnist)")
    p.add_argument("--defense", help=f"server defense: {', '.join(DEFENSES)}")
    p.add_argument("--attack", help="data-poisoning attack (`spmc list`; none = no attack)")
    p.add_argument(
        "--update-attack", help="update (model-poisoning) attack (`spmc list`); with --attack none: untargeted"
    )
    p.add_argument("--client", choices=sorted(CLIENTS), help="client procedure")
    p.add_argument("--gamma", type=float, help="malicious fraction in [0, 1)")
    p.add_argument("--rounds", type=int, help="communication rounds")
    p.add_argument("--local-epochs", type=int, help="local epochs for both client procedures")
    p.add_argument("--num-clients", type=int, help="number of clients")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train")
    p.add_argument(
        "--out", "-o", help="run directory (default runs/<dataset>-<defense>-<client>-g<gamma>-s<seed>-<time>)"
    )
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", help="any other option")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


DEMO_DESCRIPTION = (
    "Run FedAvg, SPMC (with the SPMC client), DnC (a Table 2 baseline) and FLAME (one of the added defenses), each "
    "under the paper's base backdoor (--attack badnets) and under the adaptive attack defense_aware (--attack "
    "badnets --update-attack defense_aware, which searches its scale against a copy of the server's defense): 8 "
    "runs, 2 at a time with one thread each. Then print one table (A, R = 100 − ASR, ASR over the last rounds, "
    "seconds per round) and one or two sentences that read it. The preset is `demo` (the embedded Fashion-MNIST "
    "sample, no download; chosen so that FedAvg is clearly backdoored, ASR >= 80 %, in about 90 s on a 2-core CPU); "
    "--quick runs only FedAvg and SPMC under badnets at the same setting (about 30 s, a first look); see `spmc list` "
    "and docs/quickstart.md. The run directories go to --out (default runs/demo-<time>), one per run, with the "
    "grid as matrix.toml: `spmc sweep OUT/matrix.toml` finishes an interrupted demo, `spmc matrix --report-only "
    "--out OUT` writes its tables and heat maps, `spmc plot OUT/...` its curves."
)


def _add_demo_parser(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="FedAvg, SPMC, DnC and FLAME under badnets and defense_aware, one table (the default command)",
        description=DEMO_DESCRIPTION,
    )
    demo.add_argument("--quick", action="store_true", help="only FedAvg and SPMC under badnets (about 30 s)")
    demo.add_argument("--preset", "-p", choices=sorted(PRESETS), help="another preset (default: demo)")
    demo.add_argument("--dataset", help=f"one of {', '.join(DATASETS)}")
    demo.add_argument("--data-dir", help="folder with the dataset files")
    demo.add_argument("--gamma", type=float, help="malicious fraction in [0, 1)")
    demo.add_argument("--rounds", type=int, help="communication rounds")
    demo.add_argument("--local-epochs", type=int, help="local epochs for both client procedures")
    demo.add_argument("--num-clients", type=int, help="number of clients")
    demo.add_argument("--seed", type=int, help="random seed (default 0)")
    demo.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train")
    demo.add_argument("--jobs", "-j", type=int, default=2, help="runs at once (default 2)")
    demo.add_argument("--out", "-o", help="folder of the 8 run directories (default runs/demo-<time>)")
    demo.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", help="any other option")
    demo.add_argument("--quiet", "-q", action="store_true", help="no line per finished run")
    demo.set_defaults(func=cmd_demo)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ("dataset", "data_dir", "defense", "attack", "update_attack", "client", "gamma", "rounds", "num_clients")
    values: dict[str, Any] = {name: getattr(args, name, None) for name in (*names, "seed", "device")}
    if args.local_epochs is not None:
        values["baseline_local_epochs"] = args.local_epochs
        values["spmc_local_epochs"] = args.local_epochs
    values = {k: v for k, v in values.items() if v is not None}  # flags not given; a --set null is kept
    values.update(_parse_sets(args.set))
    return values


def default_out_dir(cfg: Experiment, root: str = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{cfg.dataset}-{cfg.defense}-{cfg.client}-g{cfg.gamma}-s{cfg.seed}-{stamp}"


def _run_with_progress(cfg: Experiment, out: Path, label: str, quiet: bool, resume: bool = False) -> RunResult:
    if quiet:
        return run_experiment(cfg, out, resume=resume)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(label, total=cfg.rounds, status="loading data")

        def on_round(r: dict[str, Any]) -> None:
            progress.update(
                task, advance=1, status=f"A {r['accuracy']:.2f}  ASR {r['asr']:.2f}  ({r['seconds']:.1f}s/round)"
            )

        return run_experiment(cfg, out, on_round, resume)


def _summary_table(results: dict[str, RunResult], title: str) -> Table:
    table = Table(title=title)
    for col in ("run", "A (%)", "ASR (%)", "R (%)", "V (%)", "s/round"):
        table.add_column(col, justify="right" if col != "run" else "left")
    for label, res in results.items():
        f = res.final
        table.add_row(
            label,
            f"{f.A:.2f}",
            _metric_text(None if f.R is None else 100 - f.R),
            _metric_text(f.R),
            _metric_text(f.V),
            f"{res.summary['seconds_per_round']:.1f}",
        )
    return table


def cmd_run(args: argparse.Namespace) -> int:
    if args.resume:
        out = Path(args.resume)
        cfg = load_run_config(out)
    else:
        cfg = resolve(args.preset, args.config, **_overrides(args))
        out = Path(args.out) if args.out else default_out_dir(cfg)
    label = f"{cfg.defense}/{cfg.client} on {cfg.dataset}, γ={cfg.gamma}"
    res = _run_with_progress(cfg, out, label, args.quiet, resume=bool(args.resume))
    console.print(_summary_table({label: res}, f"last {res.final.last_k} rounds of {cfg.rounds}"))
    if res.summary.get("attack_kind") == "untargeted":
        console.print(
            "untargeted attack: R is blank; ΔA = A − A(no attack, same seed): `spmc table` with both run directories",
            highlight=False,
        )
    console.print(f"run directory: {escape(str(out))}", highlight=False)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from spmc import demo

    preset = args.preset or "demo"
    base, seed = demo.demo_base(preset, _overrides(args))
    out = Path(args.out) if args.out else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    first = demo.demo_spec(base, out, seed, quick=args.quick)
    cfg = resolve(None, None, **{**first["base"], **first["grid"]["defense"][0], **first["grid"]["attack"][0]})
    arms, attacks = demo.demo_arms(args.quick)
    console.print(
        f"demo: {len(arms) * len(attacks)} runs ({', '.join(lab for lab, _ in arms)} × "
        f"{', '.join(attacks)}), preset {preset}: {cfg.dataset}, γ = {cfg.gamma}, "
        f"{cfg.rounds} rounds, {args.jobs} at a time, in {escape(str(out))}",
        highlight=False,
        soft_wrap=True,
    )

    def report(o: SweepOutcome) -> None:
        if not args.quiet:
            console.print(f"{o.status:>8}  {escape(o.run.name)}", highlight=False)

    started = time.monotonic()
    rows = demo.run_demo(base, out, seed, args.jobs, report, quick=args.quick)
    elapsed = time.monotonic() - started
    last = min(cfg.report_last_k, cfg.rounds)
    table = Table(title=f"last {last} rounds of {cfg.rounds}; {cfg.dataset}, γ = {cfg.gamma}")
    for col in ("defense", "attack", "A (%)", "R (%)", "ASR (%)", "s/round"):
        table.add_column(col, justify="left" if col in ("defense", "attack") else "right")
    for r in rows:
        if r.status != "done":
            table.add_row(r.defense, r.attack, r.status, "", "", "")
            continue
        table.add_row(
            r.defense,
            r.attack,
            _metric_text(r.A),
            _metric_text(r.R),
            _metric_text(r.asr),
            _metric_text(r.seconds_per_round),
        )
    console.print(table)
    console.print(demo.reading(rows), highlight=False, soft_wrap=True)
    console.print(
        f"{elapsed:.0f} s in all; run directories: {escape(str(out))}/ "
        f"(`spmc sweep {escape(str(out / 'matrix.toml'))}` finishes an interrupted demo)",
        highlight=False,
        soft_wrap=True,
    )
    for r in rows:
        if r.status != "done":
            console.print(f"[red]{escape(r.defense)} under {escape(r.attack)} {r.status}:[/red] {escape(r.error)}")
    return 0 if all(r.status == "done" for r in rows) else 1


def cmd_sweep(args: argparse.Namespace) -> int:
    spec = load_grid(args.grid)
    table = Table(title=f"sweep {args.grid}")
    for col in ("run", "status", "A (%)", "R (%)", "V (%)"):
        table.add_column(col, justify="left" if col in ("run", "status") else "right")

    def report(o: SweepOutcome) -> None:
        console.print(f"{o.status:>8}  {escape(o.run.name)}", highlight=False)

    outcomes = run_sweep(spec, args.out, args.jobs, report, _ray_options(args))
    for o in outcomes:
        table.add_row(escape(o.run.name), o.status, *(_metric_text(o.summary.get(k)) for k in ("A", "R", "V")))
    console.print(table)
    unfinished = [o for o in outcomes if o.status in ("failed", "busy")]
    for o in unfinished:
        console.print(f"[red]{escape(o.run.name)} {o.status}:[/red] {escape(o.error)}", highlight=False, soft_wrap=True)
    return 1 if unfinished else 0


def cmd_matrix(args: argparse.Namespace) -> int:
    from spmc import matrix

    root = Path(args.out)
    ray = _ray_options(args)
    if args.report_only:
        spec = load_grid(root / matrix.MATRIX_FILE)
    else:
        defenses = sorted(DEFENSES) if args.defenses == ["all"] else args.defenses
        for name in defenses:
            if name not in DEFENSES:
                raise ConfigError(f"--defenses: unknown defense {name!r}; allowed: all, {', '.join(sorted(DEFENSES))}")
        attacks = matrix.all_attack_names(ATTACKS) if args.attacks == ["all"] else args.attacks
        base: dict[str, Any] = {"preset": args.preset, "gamma": args.gamma} if args.preset else {"gamma": args.gamma}
        base.update(_parse_sets(args.set))
        spec = matrix.matrix_spec(
            matrix.defense_columns(defenses),
            matrix.attack_rows(attacks, ATTACKS),
            args.seeds,
            base,
            root,
            1 if args.jobs is None else args.jobs,
        )
        matrix.save_spec(spec, root)

        def report(o: SweepOutcome) -> None:
            console.print(f"{o.status:>8}  {escape(o.run.name)}", highlight=False)

        outcomes = run_sweep(spec, root, args.jobs, report, ray)
        matrix.record_outcomes(root, outcomes)
    for path in matrix.write_report(spec, root, args.title):
        console.print(f"wrote {escape(str(path))}", highlight=False)
    return 0


def _ray_options(args: argparse.Namespace) -> RayOptions | None:
    """The Ray options of ``--ray [ADDRESS]``, ``--cpus-per-run``, ``--gpus-per-run``; None without ``--ray``."""
    if args.ray is None:
        return None
    return RayOptions(args.ray, args.cpus_per_run, args.gpus_per_run)


def _add_ray_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Ray cluster (extra spmc[ray]; see docs/cluster.md)")
    group.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run the points as Ray tasks: on a local Ray instance, or on the cluster at ADDRESS (host:port); "
        "results are written here, --jobs then caps the tasks in flight (default: all points)",
    )
    group.add_argument(
        "--cpus-per-run", type=int, default=1, help="with --ray: CPUs each point reserves, also its threads (default 1)"
    )
    group.add_argument(
        "--gpus-per-run", type=float, default=0.0, help="with --ray: GPUs each point reserves (default 0)"
    )


def _metric_text(value: Any) -> str:
    """A summary metric with 2 decimals; blank where the run stored none (null) or it is not a number."""
    return f"{value:.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def _first_line(text: str | None) -> str:
    """The first line of a docstring ("" when there is none)."""
    return (text or "").strip().partition("\n")[0]


def _attack_text(cls: type[Attack]) -> str:
    """An attack's line of ``spmc list``: its kind (what its runs report), its hooks, then its description."""
    kind = {"backdoor": "backdoor", "none": "no attack"}.get(attack_kind(cls), "untargeted")
    if kind == "untargeted" and "data" not in cls.hooks:
        kind = "update attack: untargeted with attack = none"
    hooks = ", ".join(h for h in HOOKS if h in cls.hooks) or "no hook"
    return f"[{kind}; {hooks}] {cls.description}"


def _with_origin(group: str, items: dict[str, str]) -> dict[str, str]:
    """``items`` with "[plug-in from distribution 'x']" after the description of each entry a plug-in added."""
    out = {}
    for name, desc in items.items():
        origin = plugin_origin(group, name)
        out[name] = f"{desc} [plug-in from {origin}]".strip() if origin else desc
    return out


def cmd_list(args: argparse.Namespace) -> int:
    sections: dict[str, dict[str, str]] = {
        "defenses": _with_origin("spmc.defenses", {name: cls.description for name, cls in DEFENSES.items()}),
        "clients": CLIENTS,
        "attacks": _with_origin("spmc.attacks", {name: _attack_text(cls) for name, cls in ATTACKS.items()}),
        "datasets": _with_origin("spmc.datasets", {name: info.description for name, info in DATASETS.items()}),
        "models": _with_origin("spmc.models", {name: _first_line(f.__doc__) for name, f in MODELS.items()}),
        "presets": PRESET_DESCRIPTIONS,
    }
    if args.options is not None:
        chosen = {n: f for n, f in Experiment.model_fields.items() if args.options in n}
        if not chosen:
            raise ConfigError(f"--options: no option name contains {args.options!r} (see `spmc list --options`)")
        sections = {
            "options": {
                name: f"{field.description or ''} (default {field.default!r})".strip() for name, field in chosen.items()
            }
        }
    for title, items in sections.items():
        table = Table(title=title, show_header=False)
        table.add_column("name", style="bold")
        table.add_column("description")
        for name, desc in items.items():
            table.add_row(escape(name), escape(desc))
        console.print(table)
    return 0


def _emit(text: str, out: str | None) -> None:
    """Write ``text`` to the file ``out``, or to standard output without wrapping."""
    if out is None:
        console.out(text, end="", highlight=False)
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text, encoding="utf-8")
    console.print(f"wrote {escape(out)}", highlight=False)


def cmd_table(args: argparse.Namespace) -> int:
    from spmc.report import build_table, load_paper_table, load_runs, render_table

    table = build_table(load_runs(args.runs), load_paper_table() if args.paper else None)
    _emit(render_table(table, args.format), args.out)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from spmc.report import load_runs
    from spmc.report.curves import parse_panels, plot_curves, save_figure

    panels = parse_panels(args.metric)
    paths = save_figure(plot_curves(load_runs(args.runs, need_summary=False), panels), args.out)
    console.print("wrote " + escape(", ".join(map(str, paths))), highlight=False)
    return 0


def cmd_gradcam(args: argparse.Namespace) -> int:
    from spmc.report.curves import save_figure
    from spmc.report.gradcam import compare_runs, plot_gradcam

    if args.images < 1:
        raise ConfigError(f"--images: got {args.images}; must be at least 1")
    comparison = compare_runs([args.run_a, args.run_b], args.images, args.data_dir)
    paths = save_figure(plot_gradcam(comparison), args.out, formats=("png",))
    console.print("wrote " + escape(", ".join(map(str, paths))), highlight=False)
    return 0


def _add_report_commands(sub: Any) -> None:
    runs_help = "run directories, or folders searched recursively for them"
    table = sub.add_parser("table", help="Table 2: A, R, V per defense, dataset and γ (mean ± std over seeds)")
    table.add_argument("runs", nargs="+", metavar="RUNS", help=runs_help)
    table.add_argument("--paper", action="store_true", help="put the paper's values and ours − paper beside ours")
    table.add_argument("--format", "-f", choices=["markdown", "latex", "csv"], default="markdown")
    table.add_argument("--out", "-o", help="write to this file instead of standard output")
    table.set_defaults(func=cmd_table)
    plot = sub.add_parser("plot", help="Figure 6: A and R = 100 − ASR per round, one line per run")
    plot.add_argument("runs", nargs="+", metavar="RUNS", help=runs_help)
    plot.add_argument("--out", "-o", default="figure6", help="writes PREFIX.png and PREFIX.svg (default figure6)")
    plot.add_argument("--metric", "-m", default="accuracy,asr", help="panels: accuracy, asr, asr_all, ...")
    plot.set_defaults(func=cmd_plot)
    cam = sub.add_parser("gradcam", help="Figure 7: Grad-CAM maps of two runs' final models, clean vs triggered")
    cam.add_argument("run_a", metavar="RUN_A", help="first run directory (its checkpoint.pt)")
    cam.add_argument("run_b", metavar="RUN_B", help="second run directory")
    cam.add_argument("--images", "-n", type=int, default=4, help="number of test images (rows), default 4")
    cam.add_argument("--data-dir", help="dataset folder, if not the one stored in the runs")
    cam.add_argument("--out", "-o", default="figure7", help="writes PREFIX.png (default figure7)")
    cam.set_defaults(func=cmd_gradcam)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spmc", description="SPMC and rival federated backdoor defenses")
    parser.add_argument("--verbose", "-v", action="store_true", help="log every round")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run one experiment")
    _add_run_options(run)
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    run.set_defaults(func=cmd_run)
    _add_demo_parser(sub)
    sweep = sub.add_parser("sweep", help="run a grid of experiments; finished runs are skipped, killed ones resumed")
    sweep.add_argument("grid", help="grid file (TOML with [base] and [grid]; see docs/reproducing.md)")
    sweep.add_argument("--out", "-o", help="root folder of the run directories (default: the file's `out`)")
    sweep.add_argument("--jobs", "-j", type=int, help="runs at once (default: the file's `jobs`, else 1)")
    _add_ray_options(sweep)
    sweep.set_defaults(func=cmd_sweep)
    mat = sub.add_parser(
        "matrix",
        help="every defense against every attack row (a sweep), with a CSV, Markdown tables and heat maps",
        description="Run the robustness matrix (defenses × attack rows × seeds at a preset and γ) as a sweep in "
        "--out (finished cells are skipped, interrupted ones resumed), then write matrix.csv, matrix.md and the heat "
        "maps matrix_R / matrix_A (PNG, SVG) there. See docs/matrix.md.",
    )
    mat.add_argument("--preset", "-p", choices=sorted(PRESETS), help="the preset of every cell")
    mat.add_argument("--gamma", type=float, default=0.3, help="malicious fraction γ (default 0.3)")
    mat.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default 0)")
    mat.add_argument("--defenses", nargs="+", default=["all"], help="defenses (default all)")
    mat.add_argument("--attacks", nargs="+", default=["all"], help="attacks, each a row (default all; see docs)")
    mat.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", help="any other option")
    mat.add_argument("--out", "-o", default="runs/matrix", help="folder of the cells and the report")
    mat.add_argument("--jobs", "-j", type=int, help="cells at once (default 1; with --ray: all)")
    mat.add_argument("--title", default="", help="title of matrix.md")
    mat.add_argument(
        "--report-only", action="store_true", help="only rebuild the report from --out/matrix.toml and its cells"
    )
    _add_ray_options(mat)
    mat.set_defaults(func=cmd_matrix)
    lst = sub.add_parser("list", help="defenses, clients, attacks, datasets and presets")
    lst.add_argument(
        "--options",
        nargs="?",
        const="",
        default=None,
        metavar="FILTER",
        help="list the configuration options instead (those whose name contains FILTER, e.g. spmc_)",
    )
    lst.set_defaults(func=cmd_list)
    _add_report_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
    )
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
    try:
        return int(args.func(args))
    except tuple(cls for cls, _ in EXPECTED_ERRORS) as err:
        if args.verbose:
            traceback.print_exc(file=sys.stderr)
        err_console.print(f"[red]error:[/red] {escape(error_line(err))}", highlight=False)
        return next(code for cls, code in EXPECTED_ERRORS if isinstance(err, cls))
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]: rounds finished so far are in the run directory")
        return 130


def error_line(err: BaseException) -> str:
    """One line for an expected error: ``<path>: <cause>`` for an OSError that names a file, else its message
    with its lines joined by ``; `` (by a space after a heading that ends in a colon)."""
    if isinstance(err, OSError) and err.filename is not None:
        target = f"{err.filename} -> {err.filename2}" if err.filename2 is not None else str(err.filename)
        return f"{target}: {err.strerror or err}"
    lines = [line.strip() for line in (str(err).strip() or type(err).__name__).splitlines() if line.strip()]
    out = lines[0]
    for line in lines[1:]:
        out += (" " if out.endswith(":") else "; ") + line
    return out


if __name__ == "__main__":
    sys.exit(main())
