"""Stop a ClientApp process when the SuperNode that started it is gone.

A SuperNode (``flower-supernode``) starts ``flower-superexec``, which starts one ``flwr-clientapp`` process per
message. Flower's own guard in both children polls ``os.kill(parent, 0)`` every 0.2 s, which also succeeds on a
zombie: a SuperNode killed with SIGKILL stays a zombie until its parent (a shell, a supervisor, a container's PID 1)
collects it, and until then ``flower-superexec`` and the ClientApp keep running. The ClientApp then trains to the end
and retries its reply to the dead node for minutes ("Connection attempt failed, retrying"); a SuperNode restarted on
the same port receives the orphan's calls and answers ``401 Unauthorized`` (its task token is unknown there).

:func:`watch_node` (called by the ClientApp on its first message) finds the SuperNode among the process's ancestors
and watches the chain from the parent up to it, by PID *and* start time (so a reused PID is not taken for the node),
counting a zombie as gone. When one of them is gone it logs one line, sends SIGTERM to the chain's remaining
``flower-superexec`` (the dead node's, identified by PID and start time) and then to this process, whose Flower exit
handlers end it; if it still runs ``grace`` s later it exits with status 1. Without a SuperNode among the ancestors
(Flower's simulation, tests in-process) or without ``/proc`` (not Linux) it does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SUPERNODE = "flower-supernode"
SUPEREXEC = "flower-superexec"
PROC = Path("/proc")

_started = threading.Lock()
_watching: list[threading.Thread] = []


@dataclass(frozen=True)
class ProcessId:
    """A process, told apart from a later one with the same PID by its start time (clock ticks after boot)."""

    pid: int
    start: int
    command: str


def _stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, ppid, start time)`` of ``pid`` from ``/proc/PID/stat``, or None if there is no such process."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name in (...) may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[19])


def _argv(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in (PROC / str(pid) / "cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def _command(pid: int) -> str:
    """The base names of the program and its script (``python .../flower-supernode``), space-separated."""
    return " ".join(Path(a).name for a in _argv(pid)[:2])


def _parent_pid_arg(pid: int) -> int | None:
    """The ``--parent-pid`` argument of process ``pid`` (Flower passes it to ``flower-superexec``), or None."""
    argv = _argv(pid)
    with contextlib.suppress(ValueError, IndexError):
        return int(argv[argv.index("--parent-pid") + 1])
    return None


def node_ancestry(pid: int | None = None, max_depth: int = 8) -> list[ProcessId]:
    """The ancestors of ``pid`` (this process) from its parent up to the nearest ``flower-supernode``, inclusive;
    empty when there is none within ``max_depth`` generations or no ``/proc``.

    A ``flower-superexec`` whose parent is no longer the ``--parent-pid`` it was started with outlived its node
    (it was re-parented when the node died, and Flower's guard took the node's zombie for a live process): the
    chain then ends with that node as a process that is already gone (start time -1)."""
    stat = _stat(os.getpid() if pid is None else pid)
    chain: list[ProcessId] = []
    while stat is not None and stat[1] > 1 and len(chain) < max_depth:
        parent = stat[1]
        stat = _stat(parent)
        if stat is None:
            return []
        command = _command(parent)
        chain.append(ProcessId(parent, stat[2], command))
        if SUPERNODE in command.split():
            return chain
        started_by = _parent_pid_arg(parent) if SUPEREXEC in command.split() else None
        if started_by is not None and started_by != stat[1]:
            return [*chain, ProcessId(started_by, -1, SUPERNODE)]
    return []


def is_alive(proc: ProcessId) -> bool:
    """Whether ``proc`` still runs: its PID exists, is not a zombie, and was started when ``proc`` was."""
    stat = _stat(proc.pid)
    return stat is not None and stat[0] not in ("Z", "X", "x") and stat[2] == proc.start


def first_gone(chain: list[ProcessId]) -> ProcessId | None:
    """The first process of ``chain`` that no longer runs, or None."""
    return next((p for p in chain if not is_alive(p)), None)


def _stop(chain: list[ProcessId], gone: ProcessId, grace: float) -> None:
    node = chain[-1]
    log.error(
        "SuperNode %d is gone (%s %d no longer runs): stopping this ClientApp (pid %d)",
        node.pid,
        gone.command or "process",
        gone.pid,
        os.getpid(),
    )
    for proc in chain[:-1]:
        if SUPEREXEC in proc.command.split() and is_alive(proc):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(proc.pid, signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # Flower's exit handlers end the process
    time.sleep(grace)
    os._exit(1)


def _watch(chain: list[ProcessId], interval: float, grace: float) -> None:
    parent = os.getppid()
    while True:
        time.sleep(interval)
        gone = first_gone(chain)
        if gone is None and os.getppid() != parent:  # re-parented: the parent died and was already collected
            gone = chain[0]
        if gone is not None:
            _stop(chain, gone, grace)
            return


def watch_node(interval: float = 0.5, grace: float = 5.0) -> bool:
    """Start (once per process) a daemon thread that stops this process when its SuperNode is gone (see module
    docstring). Returns whether the process is watched."""
    with _started:
        if _watching:
            return True
        chain = node_ancestry()
        if not chain:
            return False
        thread = threading.Thread(target=_watch, args=(chain, interval, grace), name="spmc-node-watch", daemon=True)
        thread.start()
        _watching.append(thread)
        log.debug("watching SuperNode %d through %s", chain[-1].pid, [p.pid for p in chain])
        return True
