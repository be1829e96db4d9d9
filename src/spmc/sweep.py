"""Sweeps: a grid of experiments run as separate processes, skipping finished runs and resuming interrupted ones.

A grid file (TOML)::

    out = "runs/table2-fmnist"        # where the run directories go (``--out`` overrides)
    jobs = 2                          # runs at once (``--jobs`` overrides)

    [base]                            # options shared by every run (any Experiment option, or a preset)
    preset = "paper-fmnist"
    rounds = 20

    [grid]                            # the cross product of these axes
    method = [{ defense = "fedavg" }, { defense = "spmc", client = "spmc" }, { defense = "dnc" }]
    gamma = [0.2, 0.3]
    seed = [0, 1, 2]

An axis value is either a plain value (it sets the option named by the axis) or a table merged into the options
(so one axis can set several options together); ``preset`` may be an axis too. Each run's directory is named after
its axis values (characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``; leading dots are
dropped, so a name never leaves the sweep folder). A directory
with ``summary.json`` is skipped; one with ``checkpoint.pt`` but no summary is resumed (``spmc run --resume``);
anything else starts afresh. Runs are independent processes, so a crash or a kill loses at most the rounds since
each run's last checkpoint.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spmc.config import ConfigError, load_toml_file, resolve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepRun:
    """One point of the grid: its directory name and its options (validated before anything runs)."""

    name: str
    options: dict[str, Any]


@dataclass
class SweepOutcome:
    run: SweepRun
    status: str
    summary: dict[str, Any] = field(default_factory=dict)
    error: str = ""


MAX_NAME = 200


def _label(axis: str, value: Any) -> str:
    text = "-".join(str(v) for v in value.values()) if isinstance(value, dict) else f"{axis}{value}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def run_name(labels: list[str]) -> str:
    """A directory name from the axis labels: only ``[A-Za-z0-9._-]``, no leading dot (so never ``.``, ``..`` or
    hidden), at most ``MAX_NAME`` characters (longer names keep a prefix and a hash of the whole), ``run`` if empty."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(labels)).lstrip(".") or "run"
    if len(name) > MAX_NAME:
        name = f"{name[: MAX_NAME - 17]}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return name


def _table(spec: dict[str, Any], key: str) -> dict[str, Any]:
    value = spec.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"sweep: {key} must be a table ([{key}]); got {value!r}")
    return dict(value)


def expand_grid(spec: dict[str, Any]) -> list[SweepRun]:
    """All runs of a grid spec (``base`` and ``grid`` tables), each validated as an Experiment."""
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep: the grid spec must be a table; got {spec!r}")
    unknown = set(spec) - {"base", "grid", "out", "jobs"}
    if unknown:
        raise ConfigError(f"sweep: unknown top-level keys {sorted(unknown)}; allowed: base, grid, out, jobs")
    base = _table(spec, "base")
    grid = _table(spec, "grid")
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep: grid.{axis} must be a non-empty list; got {values!r}")
    runs: list[SweepRun] = []
    for combo in itertools.product(*(grid[axis] for axis in grid)):
        options = dict(base)
        labels = []
        for axis, value in zip(grid, combo):
            options.update(value if isinstance(value, dict) else {axis: value})
            labels.append(_label(axis, value))
        preset = options.pop("preset", None)
        name = run_name(labels)
        try:
            resolve(preset, None, **options)  # fail early, naming the field, before any run starts
        except ConfigError as err:
            raise ConfigError(f"sweep: run {name!r}: {err}") from None
        if preset is not None:
            options = {"preset": preset, **options}
        runs.append(SweepRun(name, options))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError("sweep: two grid points map to the same run directory name; make the axis values distinct")
    return runs


def sweep_root(spec: dict[str, Any], out: str | Path | None = None) -> Path:
    """The folder of the run directories: ``out`` (``--out``), else the spec's ``out``, else ``runs/sweep``."""
    if out is not None:
        if not isinstance(out, (str, Path)) or not str(out):
            raise ConfigError(f"--out: got {out!r}; must be a folder path")
        return Path(out)
    value = spec.get("out", "runs/sweep")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"sweep: out must be a folder path (a non-empty string); got {value!r}")
    return Path(value)


def sweep_jobs(spec: dict[str, Any], jobs: int | None = None) -> int:
    """Runs at once: ``jobs`` (``--jobs``), else the spec's ``jobs``, else 1; an integer >= 1."""
    where, value = ("--jobs", jobs) if jobs is not None else ("sweep: jobs", spec.get("jobs", 1))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: got {value!r}; must be an integer >= 1")
    return value


def run_dir_in(root: Path, name: str) -> Path:
    """``root / name``, refused unless it is a direct child of ``root`` (a run never writes outside the sweep)."""
    path = root / name
    if name in ("", ".", "..") or path.resolve().parent != root.resolve():
        raise ConfigError(f"sweep: run name {name!r} is not a folder name inside {str(root)!r}")
    return path


def command_for(run: SweepRun, run_dir: Path, threads: int) -> tuple[list[str], str]:
    """The ``spmc run`` command for a run and what it will do: ``skip``, ``resume`` or ``start``."""
    if (run_dir / "summary.json").exists():
        return [], "skip"
    cmd = [sys.executable, "-m", "spmc", "run", "-q"]
    if (run_dir / "checkpoint.pt").exists() and (run_dir / "config.json").exists():
        return [*cmd, "--resume", str(run_dir)], "resume"
    options = dict(run.options)
    preset = options.pop("preset", None)
    if preset is not None:
        cmd += ["--preset", str(preset)]
    if threads:
        options.setdefault("threads", threads)
    for key, value in options.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    return [*cmd, "--out", str(run_dir)], "start"


def run_sweep(
    spec: dict[str, Any],
    out: str | Path | None = None,
    jobs: int | None = None,
    on_done: Callable[[SweepOutcome], None] | None = None,
) -> list[SweepOutcome]:
    """Run every grid point not finished yet, ``jobs`` at a time, each in its own process."""
    runs = expand_grid(spec)
    root = sweep_root(spec, out)
    jobs = sweep_jobs(spec, jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    run_dirs = {run.name: run_dir_in(root, run.name) for run in runs}
    root.mkdir(parents=True, exist_ok=True)

    def one(run: SweepRun) -> SweepOutcome:
        run_dir = run_dirs[run.name]
        cmd, action = command_for(run, run_dir, threads)
        if action != "skip":
            log.info("%s %s", action, run_dir)
            env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                outcome = SweepOutcome(run, "failed", error=(done.stderr or done.stdout).strip()[-2000:])
                if on_done is not None:
                    on_done(outcome)
                return outcome
        summary = json.loads((run_dir / "summary.json").read_text())
        outcome = SweepOutcome(run, {"skip": "skipped", "resume": "resumed", "start": "done"}[action], summary)
        if on_done is not None:
            on_done(outcome)
        return outcome

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, runs))


def load_grid(path: str | Path) -> dict[str, Any]:
    """Read a grid file."""
    return load_toml_file(path)
