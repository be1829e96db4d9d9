"""``spmc.flower.nodewatch``: a ClientApp process stops when its SuperNode is gone, also when the SuperNode is a
zombie that nobody collected (Flower's own ``os.kill(pid, 0)`` guard takes a zombie for a live process).

Real processes, no Flower: a script named ``flower-supernode`` starts a child that calls ``watch_node``; the test
kills the stand-in SuperNode with SIGKILL and does not collect it. Linux only (``/proc``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spmc.flower.nodewatch import ProcessId, first_gone, is_alive, node_ancestry

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

SRC = Path(__file__).resolve().parents[1] / "src"

# The stand-in SuperNode: starts a stand-in flower-superexec (MIDDLE: its guard, like Flower's, takes a zombie for a
# live process), which starts the "ClientApp" (CHILD) and prints its PID; then both sleep.
NODE = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
time.sleep(120)
"""

MIDDLE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
print(child.pid, flush=True)
time.sleep(120)
"""

# The stand-in ClientApp: reports whether it found its SuperNode, watches it, and would run 2 minutes.
CHILD = """
import logging, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from spmc.flower.nodewatch import node_ancestry, watch_node
chain = node_ancestry()
print([p.command for p in chain], watch_node(interval=0.1, grace=2.0), flush=True, file=sys.stderr)
time.sleep(120)
"""


def spawn(script: Path, code: str, args: list[str], log: Path) -> subprocess.Popen[str]:
    """Run ``code`` as the script ``script`` (so that its command line names it) in a new session, with spmc from
    this checkout importable; its stderr and its children's go to ``log``."""
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(log, "w") as err:
        return subprocess.Popen(
            [sys.executable, str(script), *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
            start_new_session=True,
        )


def stop_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL to the process group (session) led by ``proc``, then collect ``proc``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def pid_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, Path]]:
    """A stand-in SuperNode (in its own session) and the PID of its watched grandchild; all stopped after (the
    session's process group, by the stand-in's PID)."""
    proc = spawn(tmp_path / "flower-supernode", NODE, [MIDDLE, CHILD], tmp_path / "child.log")
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    try:
        yield proc, child, tmp_path / "child.log"
    finally:
        stop_group(proc)


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


def test_the_child_stops_when_its_supernode_is_killed_and_left_a_zombie(
    node: tuple[subprocess.Popen[str], int, Path],
) -> None:
    proc, child, log = node
    assert wait_until(lambda: "True" in log.read_text(), 30), log.read_text()
    assert "['python -c', 'python flower-supernode'] True" in log.read_text()  # found its node, 2 generations up
    time.sleep(0.5)
    assert pid_running(child)  # watching does not stop a child whose node lives
    os.kill(proc.pid, signal.SIGKILL)  # not collected: the stand-in SuperNode stays a zombie
    assert wait_until(lambda: not pid_running(proc.pid), 10)
    assert Path(f"/proc/{proc.pid}").exists()  # a zombie, which os.kill(pid, 0) still reports as alive
    os.kill(proc.pid, 0)
    assert wait_until(lambda: not pid_running(child), 15), f"child still runs; log: {log.read_text()}"
    assert "is gone" in log.read_text() and "stopping this ClientApp" in log.read_text()


def test_node_ancestry_is_empty_without_a_supernode_and_is_alive_checks_start_time() -> None:
    assert node_ancestry() == []  # pytest is not run by a flower-supernode
    me = ProcessId(os.getpid(), int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]), "python")
    assert is_alive(me) and first_gone([me]) is None
    reused = ProcessId(me.pid, me.start + 1, "python")  # same PID, another start time: another process
    assert not is_alive(reused) and first_gone([me, reused]) == reused
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    start = int(Path(f"/proc/{done.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    assert wait_until(lambda: not pid_running(done.pid), 30)  # exited, not collected yet: a zombie
    assert not is_alive(ProcessId(done.pid, start, "python"))
    done.wait()
    assert not is_alive(ProcessId(done.pid, start, "python"))


SUPEREXEC = MIDDLE  # a stand-in flower-superexec, started with --parent-pid: starts CHILD and prints its PID


@pytest.mark.parametrize("orphaned", [True, False])
def test_a_child_of_a_superexec_that_outlived_its_node_stops_at_once(tmp_path: Path, orphaned: bool) -> None:
    """Under a ``flower-superexec`` that is no longer the child of its ``--parent-pid`` (its node died), the
    ClientApp stops at once; under one whose ``--parent-pid`` is its parent it is left alone (no node above)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    parent_pid = gone.pid if orphaned else os.getpid()
    log = tmp_path / "child.log"
    proc = spawn(tmp_path / "flower-superexec", SUPEREXEC, [CHILD, "--parent-pid", str(parent_pid)], log)
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        assert wait_until(lambda: "] " in log.read_text(), 30), log.read_text()
        if orphaned:
            assert "['python flower-superexec', 'flower-supernode'] True" in log.read_text()  # its node: gone
            assert wait_until(lambda: not pid_running(child), 15), log.read_text()
            assert "stopping this ClientApp" in log.read_text()
            assert wait_until(lambda: proc.poll() is not None, 15)  # the orphaned superexec got SIGTERM too
        else:
            assert "[] False" in log.read_text()
            time.sleep(1.0)
            assert pid_running(child) and proc.poll() is None
    finally:
        stop_group(proc)
