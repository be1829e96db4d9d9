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

Processes and locks: each ``spmc run`` child dies with the sweep (Linux ``PR_SET_PDEATHSIG``, so even a SIGKILL of
the sweep takes its children along; a SIGTERM or Ctrl-C of the sweep terminates them first). While a grid point
runs, the sweep holds ``.sweep.lock`` in its directory (the child takes the run's own ``.lock``), so a second
sweep on the same grid reports that point as ``busy`` instead of running it twice. A point that fails keeps its
error in ``error.txt`` in its directory (removed when the point later finishes), so the reason outlives the console;
``spmc table`` and ``spmc plot`` quote it when they leave the folder out.

With ``ray`` (:class:`spmc.cluster.RayOptions`) the points run as Ray tasks under the same rules (:mod:`spmc.cluster`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

from spmc.config import ConfigError, load_toml_file, resolve
from spmc.data import DataError
from spmc.raytask import die_with_parent
from spmc.store import ERROR_FILE, SWEEP_LOCK, RunLock, RunLockedError, atomic_write_text, read_json_file

if TYPE_CHECKING:
    from spmc.cluster import RayOptions

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
    action = point_action(run_dir)
    cmd = [sys.executable, "-m", "spmc", "run", "-q"]
    if action == "skip":
        return [], action
    if action == "resume":
        return [*cmd, "--resume", str(run_dir)], action
    return [*cmd, *run_options_args(run, threads), "--out", str(run_dir)], action


def point_action(run_dir: Path) -> str:
    """What a sweep does with a grid point's directory: ``skip`` (it has ``summary.json``), ``resume`` (a
    ``checkpoint.pt`` and its ``config.json``) or ``start``."""
    if (run_dir / "summary.json").exists():
        return "skip"
    if (run_dir / "checkpoint.pt").exists() and (run_dir / "config.json").exists():
        return "resume"
    return "start"


def run_options_args(run: SweepRun, threads: int) -> list[str]:
    """The ``spmc run`` arguments that set a point's options: ``--preset`` and one ``--set key=JSON`` each
    (``threads`` added when non-zero and the point does not set it)."""
    options = dict(run.options)
    preset = options.pop("preset", None)
    args = ["--preset", str(preset)] if preset is not None else []
    if threads:
        options.setdefault("threads", threads)
    for key, value in options.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def run_sweep(
    spec: dict[str, Any],
    out: str | Path | None = None,
    jobs: int | None = None,
    on_done: Callable[[SweepOutcome], None] | None = None,
    ray: RayOptions | None = None,
) -> list[SweepOutcome]:
    """Run every grid point not finished yet, each in its own process: ``jobs`` at a time on this machine, or,
    with ``ray``, as Ray tasks (``jobs``, when given, caps the tasks in flight; the grid file's ``jobs`` is for
    local sweeps only) whose results are written into the run directories here (:mod:`spmc.cluster`)."""
    runs = expand_grid(spec)
    root = sweep_root(spec, out)
    if ray is None:
        jobs = sweep_jobs(spec, jobs)
        threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    else:
        jobs = sweep_jobs({}, jobs) if jobs is not None else max(1, len(runs))
        threads = ray.cpus_per_run
    run_dirs = {run.name: run_dir_in(root, run.name) for run in runs}
    root.mkdir(parents=True, exist_ok=True)
    if ray is None:
        return _run_points(runs, run_dirs, jobs, _LocalRunner(threads), on_done)
    from spmc.cluster import RayRunner, ray_session

    with ray_session(ray):
        return _run_points(runs, run_dirs, jobs, RayRunner(ray), on_done)


class _Runner(Protocol):
    """What runs one grid point's ``spmc run``: here (:class:`_LocalRunner`) or on Ray (``RayRunner``)."""

    @property
    def stopping(self) -> bool: ...

    def execute(self, run: SweepRun, run_dir: Path, action: str) -> tuple[int, str, str]: ...

    def stop(self) -> None: ...


class _LocalRunner:
    """Runs a grid point as an ``spmc run`` child of this process (``threads`` each when non-zero)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.children = _Children()

    @property
    def stopping(self) -> bool:
        return self.children.stopping

    def execute(self, run: SweepRun, run_dir: Path, action: str) -> tuple[int, str, str]:
        cmd, _ = command_for(run, run_dir, self.threads)
        env = {**os.environ, **({"OMP_NUM_THREADS": str(self.threads)} if self.threads else {})}
        return self.children.run(cmd, env)

    def stop(self) -> None:
        self.children.stop()


def _run_points(
    runs: list[SweepRun],
    run_dirs: dict[str, Path],
    jobs: int,
    runner: _Runner,
    on_done: Callable[[SweepOutcome], None] | None,
) -> list[SweepOutcome]:
    """Each point under its ``.sweep.lock``: skipped, resumed or started by ``runner``, ``jobs`` at a time."""

    def done(outcome: SweepOutcome) -> SweepOutcome:
        record_outcome(run_dirs[outcome.run.name], outcome)
        if on_done is not None:
            on_done(outcome)
        return outcome

    def one(run: SweepRun) -> SweepOutcome:
        run_dir = run_dirs[run.name]
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            point = RunLock(run_dir, SWEEP_LOCK).acquire()
        except RunLockedError as err:
            return done(SweepOutcome(run, "busy", error=str(err)))
        except OSError as err:
            return done(SweepOutcome(run, "failed", error=f"{err.filename or run_dir}: {err.strerror or err}"))
        with point:
            action = point_action(run_dir)
            if action != "skip":
                log.info("%s %s", action, run_dir)
                try:
                    code, stdout, stderr = runner.execute(run, run_dir, action)
                except OSError as err:
                    return done(SweepOutcome(run, "failed", error=f"{err.filename or run_dir}: {err.strerror or err}"))
                except ValueError as err:  # a Ray task's result that is not a run directory's files
                    return done(SweepOutcome(run, "failed", error=str(err)))
                if code != 0:
                    status = "stopped" if runner.stopping else "failed"
                    return done(SweepOutcome(run, status, error=child_error(stderr, stdout, code)))
            try:
                summary = read_json_file(run_dir / "summary.json")
            except (OSError, DataError) as err:
                return done(SweepOutcome(run, "failed", error=f"{run_dir / 'summary.json'}: {err}"))
        return done(SweepOutcome(run, {"skip": "skipped", "resume": "resumed", "start": "done"}[action], summary))

    with _terminate_on_signal(runner), ThreadPoolExecutor(max_workers=jobs) as pool:
        try:
            return list(pool.map(one, runs))
        except BaseException:
            runner.stop()
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def record_outcome(run_dir: Path, outcome: SweepOutcome) -> None:
    """Keep a failed point's error in ``run_dir/error.txt``; remove a stale one when the point has finished. A
    ``busy`` or ``stopped`` point leaves the file as it is (another process owns the point, or the user stopped it).
    A folder that cannot be written is logged, never raised: the outcome is reported either way."""
    path = run_dir / ERROR_FILE
    try:
        if outcome.status == "failed" and run_dir.is_dir():
            atomic_write_text(path, outcome.error.rstrip("\n") + "\n")
        elif outcome.status in ("done", "resumed", "skipped"):
            path.unlink(missing_ok=True)
    except OSError as err:
        log.warning("%s: cannot record the outcome (%s)", path, err.strerror or err)


def child_error(stderr: str, stdout: str, code: int) -> str:
    """What a failed ``spmc run`` said: its one-line ``error:`` message if it printed one, else the tail of its
    output, else its exit status."""
    lines = [line.strip() for line in (stderr + "\n" + stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1].removeprefix("error:").strip()
    if code < 0:
        return f"killed by signal {-code}"
    return "\n".join(lines)[-2000:] or f"exit status {code}"


class _Children:
    """The sweep's live ``spmc run`` processes: each dies with the sweep; :meth:`stop` ends them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen[str]] = set()
        self._stopping = False

    @property
    def stopping(self) -> bool:
        return self._stopping

    def run(self, cmd: list[str], env: dict[str, str]) -> tuple[int, str, str]:
        """Run ``cmd`` to completion; (exit status, stdout, stderr). Refused (-SIGTERM) once :meth:`stop` ran."""
        with self._lock:
            if self._stopping:
                return -int(signal.SIGTERM), "", "stopped"
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                preexec_fn=die_with_parent(os.getpid()),  # only a prctl and a getppid: safe after fork
            )
            self._procs.add(proc)
        try:
            stdout, stderr = proc.communicate()
        finally:
            with self._lock:
                self._procs.discard(proc)
        return proc.returncode, stdout, stderr

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every live child (and refuse new ones); SIGKILL those still alive after ``grace`` seconds."""
        with self._lock:
            self._stopping = True
            procs = list(self._procs)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def _terminate_on_signal(children: _Runner) -> Iterator[None]:
    """While the sweep runs (main thread only), SIGTERM stops the children (or Ray tasks) and exits with 143."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: FrameType | None) -> None:
        children.stop()
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def load_grid(path: str | Path) -> dict[str, Any]:
    """Read a grid file."""
    return load_toml_file(path)
