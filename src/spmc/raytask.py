"""The Ray task of a sweep point (:mod:`spmc.cluster`), and the process helper it shares with local sweeps.

This module uses only the standard library, and :func:`spmc.cluster.pickle_tasks_by_value` has Ray send its
functions by value: a worker then runs a task without importing spmc, whose ``__init__`` imports torch. That import
cost every worker process seconds before the point's own ``spmc run`` could start (``benchmarks/bench_sweep.py``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The run directory's files a task sends back, in the order the driver writes them (``summary.json`` last: it
#: marks the point finished, so it must never appear before the files it summarises).
RESULT_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "summary.json")
#: What the driver sends with a resumed point.
RESUME_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt")
#: A checkpoint larger than this stays on the worker (it travels through Ray's object store, and a finished
#: run's checkpoint only serves Grad-CAM); 256 MiB holds the paper's ResNet10 with its clients' teachers.
CHECKPOINT_LIMIT = 256 * 2**20
#: Characters of a failed run's output kept for its error message.
OUTPUT_TAIL = 4000

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the kernel SIGKILLs the child when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``;
    elsewhere a no-op); a parent that died before the call is caught by the parent-PID check."""
    prctl = getattr(ctypes.CDLL(None), "prctl", None) if sys.platform.startswith("linux") else None

    def preexec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
            if os.getppid() != parent:
                os._exit(1)

    return preexec


def execute_point(action: str, args: list[str], files: dict[str, bytes], threads: int) -> dict[str, Any]:
    """The Ray task: run ``spmc run`` for one grid point in a temporary folder of this worker and return its
    exit status, output tails, the run directory's files (:data:`RESULT_FILES`) and this host's name.

    ``action`` is ``start`` (``args`` set the options) or ``resume`` (``files`` seed the run directory)."""
    with tempfile.TemporaryDirectory(prefix="spmc-point-") as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        for name in RESUME_FILES:
            if name in files:
                (run_dir / name).write_bytes(files[name])
        cmd = [sys.executable, "-m", "spmc", "run", "-q"]
        cmd += ["--resume", str(run_dir)] if action == "resume" else [*args, "--out", str(run_dir)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, preexec_fn=die_with_parent(os.getpid()), check=False
        )
        out: dict[str, bytes] = {}
        dropped = False
        for name in RESULT_FILES:
            path = run_dir / name
            if not path.is_file():
                continue
            if name == "checkpoint.pt" and path.stat().st_size > CHECKPOINT_LIMIT:
                dropped = True
                continue
            out[name] = path.read_bytes()
    return {
        "code": proc.returncode,
        "stdout": proc.stdout[-OUTPUT_TAIL:],
        "stderr": proc.stderr[-OUTPUT_TAIL:],
        "files": out,
        "checkpoint_dropped": dropped,
        "host": socket.gethostname(),
    }
