"""Hostile-input fuzzing of spmc's front doors; prints one JSON object with the counts.

Three families of cases:

- ``options``: every option of ``Experiment`` set to each of a list of hostile values (null, booleans, ±inf, NaN,
  huge and negative numbers, strings, lists, tables), validated through ``spmc.config.resolve`` (what ``spmc run``
  and ``spmc sweep`` call first). A case is ``refused`` (ConfigError), ``accepted`` or a ``crash`` (any other
  exception). Accepted cases are listed with ``--show-accepted``: each must be a value the option really allows.
- ``defenses``: every defense of the registry on hostile but finite client states (huge, tiny, equal, zero, mixed
  scales; float32 and float64; n = 1, 2, 5). A case is ``finite`` (a finite global state), ``refused``
  (ValueError) or a ``crash`` (anything else, or a non-finite global).
- ``cli``: ``spmc`` commands in a subprocess with hostile arguments, files and run directories. A case is
  ``clear`` (exit code 1 or 2 and no Python traceback on the screen), ``ok`` (exit 0, where that is the right
  answer) or a ``traceback``.

Usage: ``python scripts/fuzz_inputs.py [--family options,defenses,cli] [--show-accepted]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from spmc.config import ConfigError, Experiment, resolve
from spmc.defenses import DEFENSES, RoundInputs
from spmc.params import ParamLayout

HOSTILE: list[Any] = [
    None,
    True,
    False,
    -1,
    0,
    2**64,
    -(2**63),
    1e308,
    -1e-300,
    math.inf,
    -math.inf,
    math.nan,
    0.5,
    "",
    "x",
    "../..",
    [],
    [1, 2],
    {},
    {"a": 1},
]


def fuzz_options(show_accepted: bool) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    accepted: list[str] = []
    crashes: list[str] = []
    for name in Experiment.model_fields:
        for value in HOSTILE:
            try:
                resolve("smoke", None, **{name: value})
            except ConfigError:
                counts["refused"] += 1
            except Exception as err:  # noqa: BLE001 - counting what escapes
                counts["crash"] += 1
                crashes.append(f"{name}={value!r}: {type(err).__name__}: {err}")
            else:
                counts["accepted"] += 1
                accepted.append(f"{name}={value!r}")
    out: dict[str, Any] = {"cases": sum(counts.values()), **counts, "crashes": crashes}
    if show_accepted:
        out["accepted_values"] = accepted
    return out


def hostile_states(n: int, d: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    big = 1e37 if dtype == torch.float32 else 1e300
    tiny = 1e-38 if dtype == torch.float32 else 1e-300
    g = torch.Generator().manual_seed(n * 7 + d)
    base = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    cases = {
        "random": base,
        "zeros": torch.zeros(n, d, dtype=dtype),
        "equal": base[:1].repeat(n, 1),
        "one_huge": torch.cat([base[:-1], torch.full((1, d), big, dtype=dtype)]),
        "all_huge": torch.full((n, d), big, dtype=dtype) * torch.sign(base),
        "tiny": torch.full((n, d), tiny, dtype=dtype) * torch.sign(base),
        "mixed_scale": base * torch.logspace(-20, 20, n, dtype=torch.float64).to(dtype).unsqueeze(1),
        "opposite": torch.cat([base[:1], -base[:1].repeat(n - 1, 1)]) if n > 1 else base,
    }
    return cases


def fuzz_defenses() -> dict[str, Any]:
    counts: Counter[str] = Counter()
    crashes: list[str] = []
    layout = ParamLayout.from_module(torch.nn.Linear(3, 2))
    d = layout.dim
    for name, cls in DEFENSES.items():
        if cls.needs_server_data:
            continue  # needs a model and data: covered by the test suite's registry-wide property test
        for dtype in (torch.float32, torch.float64):
            for n in (1, 2, 5):
                for case, states in hostile_states(n, d, dtype).items():
                    try:
                        inputs = RoundInputs(
                            torch.zeros(d, dtype=dtype),
                            states,
                            tuple(range(n)),
                            torch.full((n,), 10.0, dtype=torch.float64),
                            layout,
                            0,
                        )
                        out = cls().aggregate(inputs).global_state  # type: ignore[call-arg]
                    except ValueError:
                        counts["refused"] += 1
                        continue
                    except Exception as err:  # noqa: BLE001
                        counts["crash"] += 1
                        crashes.append(f"{name} {case} n={n} {dtype}: {type(err).__name__}: {err}")
                        continue
                    if out.shape == (d,) and bool(torch.isfinite(out).all()):
                        counts["finite"] += 1
                    else:
                        counts["crash"] += 1
                        crashes.append(f"{name} {case} n={n} {dtype}: non-finite or mis-shaped global")
    return {"cases": sum(counts.values()), **counts, "crashes": crashes}


INPUTS = ["bad.toml", "both.toml", "x.toml", "grid.toml", "dots.toml", "ro", "afile", "empty_run", "torn"]


def cli_cases(tmp: Path) -> list[tuple[str, list[str], bool]]:
    """(label, argv after ``spmc``, whether exit 0 is the right answer)."""
    bad_utf8 = tmp / "bad.toml"
    bad_utf8.write_bytes(b"rounds = 2\nname = \"\xff\xfe\"\n")
    both = tmp / "both.toml"
    both.write_text("rounds = 3\n[experiment]\nseed = 1\n")
    not_toml = tmp / "x.toml"
    not_toml.write_text("rounds = [\n")
    grid = tmp / "grid.toml"
    grid.write_text('out = 5\n[base]\npreset = "smoke"\n[grid]\nseed = [0]\n')
    grid_dots = tmp / "dots.toml"
    grid_dots.write_text('[base]\npreset = "smoke"\nrounds = 1\n[grid]\nmethod = [{ name = ".." }]\n')
    readonly = tmp / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    afile = tmp / "afile"
    afile.write_text("x")
    empty_run = tmp / "empty_run"
    empty_run.mkdir()
    torn = tmp / "torn"
    torn.mkdir()
    (torn / "config.json").write_text("{\"seed\": ")
    smoke = ["run", "-q", "--preset", "smoke"]
    out = ["--out", str(tmp / "r")]
    cases: list[tuple[str, list[str], bool]] = [
        ("krum with 4 clients", [*smoke, "--defense", "krum", *out], False),
        ("bulyan with 4 clients", [*smoke, "--defense", "bulyan", *out], False),
        ("trimmed_mean_k too large", [*smoke, "--defense", "trimmed_mean", "--set", "trimmed_mean_k=2", *out], False),
        ("multikrum_select too large", [*smoke, "--defense", "multikrum", "--set", "multikrum_select=9", *out], False),
        ("dnc_filter_frac 5", [*smoke, "--defense", "dnc", "--set", "dnc_filter_frac=5", *out], False),
        ("seed 2**32", [*smoke, "--seed", "4294967296", *out], False),
        ("cuda without a GPU", [*smoke, "--device", "cuda", *out], torch.cuda.is_available()),
        ("batched resnet10", [*smoke, "--set", "model=\"resnet10\"", "--set", "engine=\"batched\"", *out], False),
        ("threads 1e20", [*smoke, "--set", "threads=1e20", *out], False),
        ("lr inf", [*smoke, "--set", "lr=Infinity", *out], False),
        ("lr true", [*smoke, "--set", "lr=true", *out], False),
        ("rounds null", [*smoke, "--set", "rounds=null", *out], False),
        ("unknown option", [*smoke, "--set", "spmc_temprature=0.1", *out], False),
        ("preset in --set (supported: later wins)", [*smoke, "--set", "preset=\"smoke\"", *out], True),
        ("min_client_size huge", [*smoke, "--set", "min_client_size=100000", *out], False),
        ("val_fraction 0.99", [*smoke, "--set", "val_fraction=0.99", *out], False),
        ("most clients no step", [*smoke, "--num-clients", "1000", "--set", "participation=0.1", *out], False),
        ("config not UTF-8", [*smoke, "--config", str(bad_utf8), *out], False),
        ("config not TOML", [*smoke, "--config", str(not_toml), *out], False),
        ("config missing", [*smoke, "--config", str(tmp / "none.toml"), *out], False),
        ("out in a read-only folder", [*smoke, "--out", str(readonly / "r")], os.geteuid() == 0),
        ("out is a file", [*smoke, "--out", str(afile)], False),
        ("resume a folder with no run", ["run", "-q", "--resume", str(empty_run)], False),
        ("resume a torn config", ["run", "-q", "--resume", str(torn)], False),
        ("sweep out = 5", ["sweep", str(grid)], False),
        ("sweep point named .. (stays inside)", ["sweep", str(grid_dots), "--out", str(tmp / "sw")], True),
        ("sweep --jobs -3", ["sweep", str(grid), "--jobs", "-3"], False),
        ("table of nothing", ["table", str(tmp / "nothing")], False),
        ("table of a file", ["table", str(afile)], False),
        ("gradcam of non-runs", ["gradcam", str(empty_run), str(empty_run)], False),
        ("both top level and [experiment]", [*smoke, "--config", str(both), *out], True),
    ]
    return cases


def fuzz_cli() -> dict[str, Any]:
    counts: Counter[str] = Counter()
    tracebacks: list[str] = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        for label, argv, may_succeed in cli_cases(tmp):
            done = subprocess.run(
                [sys.executable, "-m", "spmc", *argv], capture_output=True, text=True, timeout=600, cwd=tmp
            )
            text = done.stdout + done.stderr
            if "Traceback (most recent call last)" in text:
                counts["traceback"] += 1
                tracebacks.append(f"{label}: {text.strip().splitlines()[-1]}")
            elif done.returncode == 0:
                counts["ok" if may_succeed else "silently_accepted"] += 1
                if not may_succeed:
                    tracebacks.append(f"{label}: exit 0")
            else:
                counts["clear"] += 1
        escaped = sorted(p.name for p in tmp.iterdir()) != sorted([*INPUTS, "r", "sw"])
        if escaped:
            counts["wrote_outside"] += 1
            tracebacks.append(f"files outside the expected folders: {sorted(p.name for p in tmp.iterdir())}")
        (tmp / "ro").chmod(0o700)
    return {"cases": sum(counts.values()), **counts, "problems": tracebacks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="options,defenses,cli")
    parser.add_argument("--show-accepted", action="store_true")
    args = parser.parse_args()
    families = set(args.family.split(","))
    report: dict[str, Any] = {}
    if "options" in families:
        report["options"] = fuzz_options(args.show_accepted)
    if "defenses" in families:
        report["defenses"] = fuzz_defenses()
    if "cli" in families:
        report["cli"] = fuzz_cli()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
