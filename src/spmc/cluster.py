"""Sweeps on a Ray cluster (``spmc sweep GRID --ray [ADDRESS]``): each grid point not finished runs as a Ray task.

The driver (the ``spmc sweep`` process) keeps every guarantee of a local sweep: it takes the point's
``.sweep.lock`` while the point's task runs, skips finished points and resumes interrupted ones. A task runs
``spmc run`` as a subprocess (a crash is contained, as locally) in a temporary folder on the worker, seeded with
the point's ``config.json``, ``metrics.jsonl`` and ``checkpoint.pt`` bytes when it resumes, and returns the run
directory's files; the driver writes them atomically into the run directory on its own disk. Workers therefore need
no shared file system, only spmc, torch and the dataset files (docs/cluster.md).

A task whose worker process or node dies is rerun by Ray (``max_retries``) from the bytes the driver sent, so a
point never needs the lost worker's disk. ``ray`` is imported only when a Ray sweep starts (extra ``spmc[ray]``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spmc.config import ConfigError
from spmc.raytask import CHECKPOINT_LIMIT, RESULT_FILES, RESUME_FILES, execute_point
from spmc.store import atomic_write_bytes
from spmc.sweep import SweepRun, run_options_args

log = logging.getLogger(__name__)

#: How often Ray reruns a task whose worker process or node died.
MAX_RETRIES = 3


@dataclass(frozen=True)
class RayOptions:
    """Where and how a sweep's points run on Ray: ``address`` ``"local"`` starts a local Ray instance, else
    ``host:port`` (or ``auto``) of a running cluster; each point reserves ``cpus_per_run`` CPUs (also its
    ``threads``) and ``gpus_per_run`` GPUs."""

    address: str = "local"
    cpus_per_run: int = 1
    gpus_per_run: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.address, str) or not self.address.strip():
            raise ConfigError(f"--ray: got {self.address!r}; must be a cluster address host:port, or nothing")
        cpus = self.cpus_per_run
        if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
            raise ConfigError(f"--cpus-per-run: got {cpus!r}; must be an integer >= 1")
        gpus = self.gpus_per_run
        if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not math.isfinite(gpus) or gpus < 0:
            raise ConfigError(f"--gpus-per-run: got {gpus!r}; must be a number >= 0")


@contextmanager
def ray_session(options: RayOptions) -> Iterator[None]:
    """Connect to the cluster (or start a local instance) for the sweep, and disconnect afterwards."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray: the ray package is not installed; install spmc[ray]") from None
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if options.address == "local":
        kwargs["include_dashboard"] = False
    try:
        with warnings.catch_warnings():  # Ray's notice about a future change of accelerator variables
            warnings.simplefilter("ignore", FutureWarning)
            ray.init(address=options.address, **kwargs)
    except ConnectionError as err:
        raise ConfigError(f"--ray: cannot connect to {options.address!r} ({err})") from None
    try:
        yield
    finally:
        ray.shutdown()


def write_results(run_dir: Path, files: Any) -> None:
    """Write a task's returned files into ``run_dir`` atomically, ``summary.json`` last; only the names of
    :data:`RESULT_FILES` are written (a worker never chooses a path), each must be bytes."""
    if not isinstance(files, dict):
        raise ValueError(f"ray task: files must be a mapping of name to bytes; got {type(files).__name__}")
    for name in files:
        if name not in RESULT_FILES or not isinstance(files[name], bytes):
            raise ValueError(f"ray task: returned file {name!r} is not allowed; allowed: {', '.join(RESULT_FILES)}")
    for name in RESULT_FILES:
        if name in files:
            atomic_write_bytes(run_dir / name, files[name])


def pickle_tasks_by_value() -> None:
    """Have Ray's cloudpickle send the functions of :mod:`spmc.raytask` by value, so that a worker runs a task
    without importing spmc (and torch) first."""
    import ray.cloudpickle

    from spmc import raytask

    ray.cloudpickle.register_pickle_by_value(raytask)


class RayRunner:
    """Runs grid points as Ray tasks; :meth:`stop` cancels those in flight and refuses new ones."""

    def __init__(self, options: RayOptions) -> None:
        import ray

        self._ray = ray
        self._threads = options.cpus_per_run
        pickle_tasks_by_value()
        self._remote = ray.remote(execute_point).options(
            num_cpus=options.cpus_per_run,
            num_gpus=options.gpus_per_run,
            max_retries=MAX_RETRIES,
            retry_exceptions=[OSError],  # a worker's disk trouble may be its own: try again, maybe elsewhere
        )
        self._lock = threading.Lock()
        self._refs: set[Any] = set()
        self._stopping = False

    @property
    def stopping(self) -> bool:
        return self._stopping

    def execute(self, run: SweepRun, run_dir: Path, action: str) -> tuple[int, str, str]:
        """Run the point's task to completion (retried by Ray if its worker dies) and write its files into
        ``run_dir``; (exit status, stdout, stderr) of its ``spmc run``."""
        files = {n: (run_dir / n).read_bytes() for n in RESUME_FILES if action == "resume" and (run_dir / n).is_file()}
        args = run_options_args(run, self._threads)
        with self._lock:
            if self._stopping:
                return -15, "", "stopped"
            ref = self._remote.remote(action if action == "resume" else "start", args, files, self._threads)
            self._refs.add(ref)
        try:
            result = self._ray.get(ref)
        except self._ray.exceptions.RayError as err:
            lines = [line for line in str(err).splitlines() if line.strip()]
            return 1, "", f"error: ray task failed: {type(err).__name__}: {lines[-1].strip() if lines else ''}"
        finally:
            with self._lock:
                self._refs.discard(ref)
        if not isinstance(result, dict):
            return 1, "", f"error: ray task returned {type(result).__name__}, not a result"
        write_results(run_dir, result.get("files"))
        if result.get("checkpoint_dropped"):
            (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # never keep a checkpoint older than the metrics
            log.warning("%s: checkpoint over %d bytes left on %s", run_dir, CHECKPOINT_LIMIT, result.get("host"))
        log.info("%s ran on %s", run_dir, result.get("host"))
        code = result.get("code")
        return (
            code if isinstance(code, int) else 1,
            str(result.get("stdout", "")),
            str(result.get("stderr", "")),
        )

    def stop(self) -> None:
        """Cancel every task in flight (force: its worker process and its ``spmc run`` die) and refuse new ones."""
        with self._lock:
            self._stopping = True
            refs = list(self._refs)
        for ref in refs:
            try:
                self._ray.cancel(ref, force=True)
            except Exception as err:  # a task that just finished cannot be cancelled: nothing left to stop
                log.debug("cancel: %s", err)


def _proc_stat(pid: str) -> tuple[int, int] | None:
    """(parent PID, session ID) of a process from ``/proc/PID/stat``; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session ...
    return int(fields[1]), int(fields[3])


def processes_of(sessions: set[int], ancestor: int | None = None) -> list[int]:
    """Live PIDs (Linux ``/proc``) whose session is one of ``sessions``, or, with ``ancestor``, whose parent
    chain leads to it: what is left of process trees that should have been stopped."""
    stats = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := _proc_stat(p)) is not None}
    left = []
    for pid, (ppid, sid) in stats.items():
        chain, seen = ppid, 0
        while ancestor is not None and chain > 1 and chain != ancestor and seen < 4096:
            chain, seen = stats.get(chain, (0, 0))[0], seen + 1
        if sid in sessions or (ancestor is not None and chain == ancestor and pid != ancestor):
            left.append(pid)
    return sorted(left)


class LocalCluster:
    """A Ray cluster on 127.0.0.1 for tests and benchmarks: a head and worker nodes, each a ``ray start --block``
    with its own CPU count, in its own session and process group, so that :meth:`kill_node` and :meth:`stop`
    end a node with all its processes by PID (never ``ray stop``, which stops every Ray on the machine).

    ``temp_dir`` must be short (Ray's socket paths live under it; a Unix socket path has at most 107 bytes)."""

    def __init__(self, cpus: list[int], temp_dir: Path, ray_bin: str | None = None) -> None:
        if not cpus or any(c < 0 for c in cpus):
            raise ValueError(f"cpus: got {cpus!r}; must be one count >= 0 per node, the head first")
        self.cpus = list(cpus)
        self.temp_dir = Path(temp_dir)
        self.ray_bin = ray_bin or str(Path(sys.executable).with_name("ray"))
        self.port = 0
        self.nodes: list[subprocess.Popen[bytes]] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start_node(self, index: int, head: bool) -> None:
        cmd = [self.ray_bin, "start", "--block", "--num-cpus", str(self.cpus[index]), "--disable-usage-stats"]
        if head:
            cmd += ["--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port)]
            cmd += ["--temp-dir", str(self.temp_dir), "--include-dashboard", "false"]
        else:
            cmd += ["--address", self.address, "--node-ip-address", "127.0.0.1"]
        log_file = open(self.temp_dir / f"node{index}.log", "wb")  # noqa: SIM115 (the node keeps writing it)
        with log_file:
            self.nodes.append(subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True))

    def start(self, timeout: float = 120.0) -> None:
        """Start the head, then the worker nodes; return once every node is alive in the cluster."""
        import ray

        self.temp_dir.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._start_node(0, head=True)
        self._wait(lambda: _can_connect(self.port), timeout, "the head's GCS port")
        for i in range(1, len(self.cpus)):
            self._start_node(i, head=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ray.init(address=self.address, log_to_driver=False, configure_logging=False)
        try:
            self._wait(lambda: sum(n["Alive"] for n in ray.nodes()) == len(self.cpus), timeout, "every node")
        finally:
            ray.shutdown()

    def _wait(self, ready: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.pid for p in self.nodes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(
                    f"ray cluster: no {what} after {timeout:.0f} s (exited nodes: {dead}); logs in {self.temp_dir}"
                )
            time.sleep(0.3)

    def kill_node(self, index: int) -> None:
        """SIGKILL node ``index`` with every process of its group (its raylet, workers and their children)."""
        node = self.nodes[index]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
        node.wait()

    def stop(self, grace: float = 10.0) -> list[int]:
        """Stop every node by its process group (SIGTERM, SIGKILL after ``grace`` s), workers first; the PIDs still
        alive in the nodes' sessions afterwards (empty when all is gone)."""
        sessions = {p.pid for p in self.nodes}
        for node in reversed(self.nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while processes_of(sessions) and time.monotonic() < deadline:
            for node in self.nodes:
                node.poll()
            time.sleep(0.2)
        for node in self.nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
            node.wait()
        deadline = time.monotonic() + grace
        while (left := processes_of(sessions)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left


def _can_connect(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
