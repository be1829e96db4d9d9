"""A SuperNode killed while its ClientApp trains, and restarted on the same port: real ``flower-superlink`` and
``flower-supernode`` processes on 127.0.0.1, each stopped by its PID (process group) in the fixture's teardown.

The SuperNode alone gets SIGKILL (as from a crash or the OOM killer) and is left a zombie for a while, as under a
parent that does not collect it at once. Flower's own guard takes the zombie for a live process: without
``spmc.flower.nodewatch`` the ClientApp went on training and retrying its reply for ~40 s and its
``flower-superexec`` for minutes; once a SuperNode was restarted on the same port, both talked to it (``401
Unauthorized`` on ``send-task-heartbeat``, and a ClientApp of the new node started by the dead node's superexec).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from spmc.flower.localhost import LocalDeployment  # noqa: E402
from spmc.store import RunStore  # noqa: E402
from tests._deployment import running  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "examples" / "flower"
BIN = Path(sys.executable).parent
RUN = {
    "dataset": "synthetic",
    "synthetic_train_size": 2000,  # long enough local training that node 0 dies in the middle of it
    "synthetic_test_size": 100,
    "num_clients": 2,
    "gamma": 0.0,
    "rounds": 3,
    "baseline_local_epochs": 3,
    "batch_size": 32,
    "defense": "fedavg",
    "client": "plain",
    "threads": 1,
    "resume": False,
    "round-timeout": 60.0,
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc"),
    pytest.mark.skipif(
        not all((BIN / tool).exists() for tool in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr")),
        reason=f"Flower's executables are not in {BIN} (install spmc[flower] into this environment)",
    ),
]


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[LocalDeployment]:
    with running(LocalDeployment(APP, tmp_path / "deploy", 2)) as dep:
        yield dep


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def newest_clientapp(dep: LocalDeployment, pgid: int) -> int | None:
    """The PID of the newest ``flwr-clientapp`` of the node with process group ``pgid`` once it has loaded torch
    (then it has built the spmc ClientApp), or None."""
    apps = [pid for pid, command in dep.group_members(pgid) if "flwr-clientapp" in command]
    if not apps:
        return None
    newest = max(apps, key=lambda pid: int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]))
    try:
        return newest if "libtorch" in Path(f"/proc/{newest}/maps").read_text() else None
    except OSError:
        return None


def test_a_killed_supernode_takes_its_clientapp_along_and_restarts_on_its_port(
    deployment: LocalDeployment, tmp_path: Path
) -> None:
    dep = deployment
    store = RunStore(tmp_path / "run")
    proc = dep.submit({**RUN, "out-dir": str(tmp_path / "run")}, name="run")
    node = dep.nodes[0]
    assert node is not None
    wait_for(lambda: len(store.read_metrics()) >= 1, 300, "round 1")
    wait_for(lambda: dep.log_text("supernode-0").count("Start `flwr-clientapp`") >= 2, 120, "round 2 on node 0")
    wait_for(lambda: newest_clientapp(dep, node.pid), 120, "SuperNode 0's ClientApp to train in round 2")
    time.sleep(2.0)  # the app is built (and watches its node) right after torch is loaded
    dep.kill_node(0, whole_group=False, reap=False)  # the SuperNode only; it stays a zombie
    try:
        wait_for(lambda: not dep.group_members(node.pid), 30, "the dead SuperNode's superexec and ClientApp to stop")
    except AssertionError as err:
        raise AssertionError(f"{err}: {dep.group_members(node.pid)}\n{dep.log_text('supernode-0')[-3000:]}") from None
    assert "stopping this ClientApp" in dep.log_text("supernode-0")

    dep.restart_node(0)  # on the same Runtime API port
    assert proc.wait(timeout=400) == 0, dep.log_text("run")[-3000:]
    restarted = dep.log_text("supernode-0").split("Starting Flower SuperNode")[-1]
    # "401" alone also occurs inside node and message ids: look for the status code as a word
    assert re.search(r"\b401\b", restarted) is None and "authentication failed" not in restarted, restarted[-3000:]
    first, second, third = store.read_metrics()
    assert (first["num_aggregated"], second["num_aggregated"], second["num_failed"]) == (2, 1, 1)
    assert third["clients"] == [0, 1], third  # the restarted node is back, with its partition
