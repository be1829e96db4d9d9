"""The robustness matrix (issue 15): every defense against every attack row, from one command.

A matrix is a sweep (:mod:`spmc.sweep`) over three axes, ``defense`` (a column: a defense with its natural client
procedure, SPMC with the SPMC client), ``attack`` (a row, below) and ``seed``, on top of a preset and γ. Its grid is
written to ``matrix.toml`` in the output folder, so ``spmc sweep DIR/matrix.toml`` resumes it as well, and every
guarantee of a sweep holds: finished cells are skipped, interrupted ones resumed, a cell being run elsewhere is
``busy``.

Attack rows (ATTACKS.md §A1-§A5):

* ``none``: no attack (also the reference of ΔA);
* every data attack alone (``badnets``, ``blended``, ``dba``, ``semantic``, ``a3fl``, ``label_flip``, ...);
* every update attack that carries a backdoor (``Attack.carries_backdoor``: model replacement, PGD, Neurotoxin, the
  adaptive attacks) on top of the base data attack (``badnets``), labelled ``badnets+scaling``;
* every other update attack (Byzantine: LIE, min-max, IPM, ...) with no data attack: untargeted.

Metrics of a cell, over its seeds (mean, and the standard deviation when there are several): A and R = 100 − ASR
for backdoor rows; A and ΔA = A − A(row ``none``, same defense, same seed) for untargeted rows, R blank. A cell not
finished shows its state (``running``, ``failed``, ``pending``), never a number. Per defense, its worst case over the
rows (the lowest R over backdoor rows, the lowest A over all rows) and a ranking: by worst-case R, then worst-case A.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from spmc.config import ConfigError
from spmc.store import SWEEP_LOCK, RunLock, RunLockedError, read_json_file, recorded_error
from spmc.sweep import SweepOutcome, _label, run_dir_in, run_name

log = logging.getLogger(__name__)

Status = Literal["done", "running", "failed", "pending"]
MATRIX_FILE = "matrix.toml"
STATUS_FILE = "matrix-status.json"
BASE_ATTACK = "badnets"


@dataclass(frozen=True)
class Axis:
    """One column or row of the matrix: its label and the options it sets."""

    label: str
    options: dict[str, Any]


def defense_columns(names: Sequence[str]) -> list[Axis]:
    """A column per defense, with its natural client procedure (SPMC's own client for ``spmc``, else plain)."""
    return [Axis(n, {"defense": n, "client": "spmc" if n == "spmc" else "plain"}) for n in names]


def attack_rows(names: Sequence[str], attacks: dict[str, Any], base: str = BASE_ATTACK) -> list[Axis]:
    """A row per attack name (see the module docstring); ``none`` first when asked for."""
    rows = []
    for name in names:
        if name not in attacks:
            raise ConfigError(f"matrix: attack {name!r} is not registered; allowed: {', '.join(sorted(attacks))}")
        cls = attacks[name]
        if name == "none":
            rows.append(Axis("none", {"attack": "none", "update_attack": "none"}))
        elif "data" in cls.hooks:
            rows.append(Axis(name, {"attack": name, "update_attack": "none"}))
        elif getattr(cls, "carries_backdoor", False):
            rows.append(Axis(f"{base}+{name}", {"attack": base, "update_attack": name}))
        else:
            rows.append(Axis(name, {"attack": "none", "update_attack": name}))
    return sorted(rows, key=lambda r: r.label != "none")


def all_attack_names(attacks: dict[str, Any]) -> list[str]:
    """Every registered attack once (aliases such as ``base`` of ``badnets`` left out), ``none`` first."""
    seen: dict[type, str] = {}
    for name, cls in attacks.items():
        seen.setdefault(cls, name)
    return sorted(seen.values(), key=lambda n: (n != "none", n))


def matrix_spec(
    columns: Sequence[Axis],
    rows: Sequence[Axis],
    seeds: Sequence[int],
    base: dict[str, Any],
    out: str | Path,
    jobs: int = 1,
) -> dict[str, Any]:
    """The sweep grid of a matrix: ``base`` options, then the axes defense × attack × seed."""
    if not columns or not rows or not seeds:
        raise ConfigError("matrix: needs at least one defense, one attack row and one seed")
    return {
        "out": str(out),
        "jobs": jobs,
        "base": dict(base),
        "grid": {
            "defense": [dict(c.options) for c in columns],
            "attack": [dict(r.options) for r in rows],
            "seed": list(seeds),
        },
    }


def _axis_label(options: dict[str, Any], kind: str) -> str:
    if kind == "defense":
        return str(options["defense"])
    attack, update = options.get("attack", "none"), options.get("update_attack", "none")
    if update == "none":
        return str(attack)
    return str(update) if attack == "none" else f"{attack}+{update}"


@dataclass
class Cell:
    """One run of the matrix: its column, row, seed, state and metrics (None until done)."""

    defense: str
    attack: str
    seed: int
    run_dir: Path
    status: Status = "pending"
    kind: str = ""
    A: float | None = None
    R: float | None = None
    dA: float | None = None
    seconds: float | None = None
    error: str = ""


def _status(run_dir: Path, failed: dict[str, str]) -> tuple[Status, dict[str, Any] | None, str]:
    """The state of a run directory: done (with its summary), running (its sweep lock is held), failed (the last
    matrix run said so, or a sweep left its ``error.txt``, and it has no summary), or pending."""
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        try:
            return "done", read_json_file(summary_path), ""
        except (OSError, ValueError) as err:
            return "failed", None, f"{summary_path}: {err}"
    if run_dir.is_dir():
        try:
            with RunLock(run_dir, SWEEP_LOCK).acquire():
                pass
        except RunLockedError:
            return "running", None, ""
        except OSError as err:
            return "failed", None, str(err)
    if run_dir.name in failed:
        return "failed", None, failed[run_dir.name]
    recorded = recorded_error(run_dir)
    if recorded:
        return "failed", None, recorded
    return "pending", None, ""


def _number(value: Any) -> float | None:
    return (
        float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else None
    )


def collect(spec: dict[str, Any], root: Path) -> list[Cell]:
    """Every cell of the matrix ``spec`` with its state, read from the run directories under ``root``."""
    grid = spec["grid"]
    failed: dict[str, str] = {}
    status_file = root / STATUS_FILE
    if status_file.exists():
        try:
            failed = {k: str(v) for k, v in read_json_file(status_file).get("failed", {}).items()}
        except (OSError, ValueError, AttributeError) as err:
            log.warning("%s is unreadable (%s); failures of the last run are not shown", status_file, err)
    cells = []
    for d in grid["defense"]:
        for a in grid["attack"]:
            for s in grid["seed"]:
                name = run_name([_label("defense", d), _label("attack", a), _label("seed", s)])
                run_dir = run_dir_in(root, name)
                status, summary, error = _status(run_dir, failed)
                cell = Cell(_axis_label(d, "defense"), _axis_label(a, "attack"), int(s), run_dir, status, error=error)
                cell.kind = _kind_of(a)  # an unfinished backdoor row is still listed in the R table, as unfinished
                if summary is not None:
                    cell.kind = str(summary.get("attack_kind") or cell.kind)
                    cell.A = _number(summary.get("A"))
                    cell.R = _number(summary.get("R")) if cell.kind == "backdoor" else None
                    cell.seconds = _run_seconds(summary)
                cells.append(cell)
    by_key = {(c.defense, c.attack, c.seed): c for c in cells}
    for c in cells:
        ref = by_key.get((c.defense, "none", c.seed))
        if c.kind == "untargeted" and c.A is not None and ref is not None and ref.A is not None:
            c.dA = c.A - ref.A
    return cells


def _run_seconds(summary: dict[str, Any]) -> float | None:
    """A finished run's time in its rounds (``seconds_per_round`` × ``rounds``: start-up not included)."""
    per_round, rounds = _number(summary.get("seconds_per_round")), _number(summary.get("rounds"))
    return None if per_round is None or rounds is None else per_round * rounds


def _kind_of(row: dict[str, Any]) -> str:
    """The kind of a row from its options when a summary does not say: none, backdoor or untargeted."""
    attack, update = row.get("attack", "none"), row.get("update_attack", "none")
    if attack == "none" and update == "none":
        return "none"
    from spmc.attacks import ATTACKS

    cls = ATTACKS.get(attack)
    return "backdoor" if cls is not None and getattr(cls, "targeted", False) else "untargeted"


@dataclass
class Summary:
    """The matrix over seeds: per (row, column) the mean and std of A, R, ΔA, or the state of an unfinished cell."""

    defenses: list[str]
    attacks: list[str]
    kinds: dict[str, str]
    values: dict[tuple[str, str], dict[str, tuple[float, float] | None]] = field(default_factory=dict)
    states: dict[tuple[str, str], str] = field(default_factory=dict)
    #: Runs finished, runs in the matrix, and the finished runs' time in their rounds, summed.
    done: int = 0
    total: int = 0
    run_seconds: float = 0.0


def _stat(values: Sequence[float | None]) -> tuple[float, float] | None:
    known = [v for v in values if v is not None]
    if not known or len(known) != len(values):
        return None
    return statistics.fmean(known), statistics.stdev(known) if len(known) > 1 else 0.0


def summarise(cells: Sequence[Cell]) -> Summary:
    """Means over seeds; a (row, column) with any seed unfinished shows the least advanced state."""
    defenses = list(dict.fromkeys(c.defense for c in cells))
    attacks = list(dict.fromkeys(c.attack for c in cells))
    kinds: dict[str, str] = {}
    finished = [c for c in cells if c.status == "done"]
    seconds = math.fsum(c.seconds for c in finished if c.seconds is not None)
    out = Summary(defenses, attacks, kinds, done=len(finished), total=len(cells), run_seconds=seconds)
    for d in defenses:
        for a in attacks:
            group = [c for c in cells if c.defense == d and c.attack == a]
            kinds.setdefault(a, next((c.kind for c in group if c.kind), ""))
            states = {c.status for c in group}
            if states != {"done"}:
                out.states[(d, a)] = next(s for s in ("failed", "running", "pending") if s in states)
                continue
            out.values[(d, a)] = {
                "A": _stat([c.A for c in group]),
                "R": _stat([c.R for c in group]),
                "dA": _stat([c.dA for c in group]),
            }
    return out


def worst_cases(summary: Summary) -> dict[str, dict[str, Any]]:
    """Per defense: the lowest R over backdoor rows and the lowest A over all rows (with the rows reaching them),
    over the finished cells, and how many cells are not finished."""
    out: dict[str, dict[str, Any]] = {}
    for d in summary.defenses:
        r = [(v["R"][0], a) for a in summary.attacks if (v := summary.values.get((d, a))) and v["R"] is not None]
        acc = [(v["A"][0], a) for a in summary.attacks if (v := summary.values.get((d, a))) and v["A"] is not None]
        out[d] = {
            "min_R": min(r)[0] if r else None,
            "min_R_attack": min(r)[1] if r else "",
            "min_A": min(acc)[0] if acc else None,
            "min_A_attack": min(acc)[1] if acc else "",
            "unfinished": sum(1 for a in summary.attacks if (d, a) in summary.states),
        }
    return out


def ranking(worst: dict[str, dict[str, Any]]) -> list[str]:
    """Defenses by worst-case R (higher first), then worst-case A; defenses with no finished backdoor cell last."""

    def key(d: str) -> tuple[float, float]:
        w = worst[d]
        return (-(w["min_R"] if w["min_R"] is not None else -1.0), -(w["min_A"] if w["min_A"] is not None else -1.0))

    return sorted(worst, key=key)


def to_csv(cells: Sequence[Cell]) -> str:
    """The long form: one line per run."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["defense", "attack", "kind", "seed", "status", "A", "R", "dA", "seconds", "run_dir"])
    for c in cells:
        row = [c.defense, c.attack, c.kind, c.seed, c.status]
        row += ["" if v is None else f"{v:.2f}" for v in (c.A, c.R, c.dA)]
        row += ["" if c.seconds is None else f"{c.seconds:.1f}"]
        writer.writerow([*row, c.run_dir.name])
    return buf.getvalue()


def _fmt(stat: tuple[float, float] | None, signed: bool = False) -> str:
    if stat is None:
        return "–"
    mean, std = stat
    text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return f"{text} ± {std:.1f}" if std else text


def to_markdown(summary: Summary, title: str = "") -> str:
    """The R table (backdoor rows), the A table (ΔA in brackets for untargeted rows), the worst cases, the ranking."""
    lines = [f"# {title}", ""] if title else []
    lines += [
        f"{summary.done} of {summary.total} runs finished; their rounds took {summary.run_seconds / 3600:.2f} h in "
        "all (summed over runs: with N at once the wall time is about 1/N of that, on a machine as loaded as it was; "
        "start-up not included).",
        "",
    ]
    head = "| attack \\ defense | " + " | ".join(summary.defenses) + " |"
    rule = "|---|" + "---|" * len(summary.defenses)
    for metric, header in (("R", "R = 100 − ASR (backdoor rows; higher is better)"), ("A", "A, clean accuracy")):
        lines += [f"## {header}", "", head, rule]
        for a in summary.attacks:
            kind = summary.kinds.get(a, "")
            if metric == "R" and kind != "backdoor":
                continue
            cells = []
            for d in summary.defenses:
                state = summary.states.get((d, a))
                if state is not None:
                    cells.append(state)
                    continue
                v = summary.values[(d, a)]
                text = _fmt(v[metric])
                if metric == "A" and kind == "untargeted":
                    text += f" (ΔA {_fmt(v['dA'], signed=True)})"
                cells.append(text)
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        lines.append("")
    worst = worst_cases(summary)
    lines += ["## Worst case per defense", "", "| rank | defense | min R | attack | min A | attack | unfinished |"]
    lines.append("|---|---|---|---|---|---|---|")
    for rank, d in enumerate(ranking(worst), start=1):
        w = worst[d]
        r = "–" if w["min_R"] is None else f"{w['min_R']:.1f}"
        acc = "–" if w["min_A"] is None else f"{w['min_A']:.1f}"
        lines.append(f"| {rank} | {d} | {r} | {w['min_R_attack']} | {acc} | {w['min_A_attack']} | {w['unfinished']} |")
    lines.append("")
    return "\n".join(lines)


def heatmap(summary: Summary, metric: Literal["R", "A"], title: str = "") -> Any:
    """A heat map of R (backdoor rows) or A (every row; untargeted rows annotated with ΔA); unfinished cells grey
    with their state."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    attacks = [a for a in summary.attacks if metric == "A" or summary.kinds.get(a) == "backdoor"]
    grid = np.full((len(attacks), len(summary.defenses)), np.nan)
    labels: list[list[str]] = []
    for i, a in enumerate(attacks):
        row = []
        for j, d in enumerate(summary.defenses):
            state = summary.states.get((d, a))
            v = summary.values.get((d, a))
            stat = None if v is None else v[metric]
            if state is not None or stat is None:
                row.append(state or "–")
                continue
            grid[i, j] = stat[0]
            text = f"{stat[0]:.0f}"
            if metric == "A" and summary.kinds.get(a) == "untargeted" and v is not None and v["dA"] is not None:
                text += f"\n{v['dA'][0]:+.0f}"
            row.append(text)
        labels.append(row)
    width = max(4.5, 2.0 + 0.75 * len(summary.defenses))
    fig, ax = plt.subplots(figsize=(width, max(3.0, 1.5 + 0.45 * len(attacks))))
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#d0d0d0")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(summary.defenses)), summary.defenses, rotation=45, ha="right")
    ax.set_yticks(range(len(attacks)), attacks)
    for i, row in enumerate(labels):
        for j, text in enumerate(row):
            ax.text(j, i, text, ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_title(title or ("R = 100 − ASR" if metric == "R" else "A (untargeted rows: A, ΔA)"), fontsize=10)
    fig.tight_layout()
    return fig


def write_report(spec: dict[str, Any], root: Path, title: str = "") -> list[Path]:
    """Collect the cells of ``spec`` under ``root`` and write ``matrix.csv``, ``matrix.md`` and the heat maps
    ``matrix_R`` / ``matrix_A`` (PNG and SVG); the paths written."""
    import matplotlib.pyplot as plt

    cells = collect(spec, root)
    summary = summarise(cells)
    written = []
    for name, text in (("matrix.csv", to_csv(cells)), ("matrix.md", to_markdown(summary, title))):
        path = root / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    metrics: tuple[Literal["R", "A"], ...] = ("R", "A")
    for metric in metrics:
        fig = heatmap(summary, metric)
        for ext in ("png", "svg"):
            path = root / f"matrix_{metric}.{ext}"
            fig.savefig(path, dpi=150)
            written.append(path)
        plt.close(fig)
    return written


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise ConfigError(f"matrix: option value {value!r} cannot be written to {MATRIX_FILE}")


def to_toml(spec: dict[str, Any]) -> str:
    """The matrix's grid as a sweep file (``spmc sweep`` reads it)."""
    lines = ["# The robustness matrix's grid (spmc matrix); `spmc sweep` on this file resumes it.", ""]
    lines += [f"out = {_toml_value(spec['out'])}", f"jobs = {_toml_value(spec['jobs'])}", "", "[base]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in spec["base"].items()]
    lines += ["", "[grid]"]
    for axis, values in spec["grid"].items():
        lines.append(f"{axis} = [")
        lines += [f"  {_toml_value(v)}," for v in values]
        lines.append("]")
    return "\n".join(lines) + "\n"


def save_spec(spec: dict[str, Any], root: Path) -> Path:
    """Write ``matrix.toml`` in ``root``; refused when ``root`` already holds a matrix of other base options (its
    runs would be reused for another setting)."""
    from spmc.config import load_toml_file

    path = root / MATRIX_FILE
    if path.exists():
        old = load_toml_file(path)
        if old.get("base") != spec["base"]:
            raise ConfigError(
                f"matrix: {root} holds a matrix of other base options ({old.get('base')!r}, now {spec['base']!r}); "
                "choose another --out"
            )
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(spec), encoding="utf-8")
    return path


def record_outcomes(root: Path, outcomes: Iterable[SweepOutcome]) -> None:
    """Remember the cells that failed in the last run (``matrix-status.json``), so the report shows them as failed."""
    failed = {o.run.name: o.error for o in outcomes if o.status == "failed"}
    (root / STATUS_FILE).write_text(json.dumps({"failed": failed}, indent=2, sort_keys=True), encoding="utf-8")
