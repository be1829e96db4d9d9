"""A real Flower deployment on 127.0.0.1: one ``flower-superlink`` and three ``flower-supernode`` processes on free
ports, a private FLWR_HOME, and ``flwr run`` of ``examples/flower``; then the same with one SuperNode killed in the
middle of a round. Every process is stopped by its PID (process group) in the fixture's teardown, also on failure.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from spmc.flower.localhost import LocalDeployment  # noqa: E402
from spmc.store import RunStore  # noqa: E402
from tests._deployment import running  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "examples" / "flower"
BIN = Path(sys.executable).parent
NODES = 3
RUN = {
    "dataset": "synthetic",
    "synthetic_train_size": 400,
    "synthetic_test_size": 100,
    "num_clients": NODES,
    "gamma": 0.34,
    "rounds": 2,
    "baseline_local_epochs": 1,
    "spmc_local_epochs": 1,
    "batch_size": 32,
    "defense": "spmc",
    "client": "spmc",
    "threads": 1,
    "resume": False,
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all((BIN / tool).exists() for tool in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr")),
        reason=f"Flower's executables are not in {BIN} (install spmc[flower] into this environment)",
    ),
]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    workdir = tmp_path_factory.mktemp("flower-deployment")
    with running(LocalDeployment(APP, workdir, NODES)) as dep:
        yield dep
        shutil.rmtree(workdir / "flwr-home", ignore_errors=True)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def test_flwr_run_on_a_localhost_deployment(deployment: LocalDeployment, tmp_path: Path) -> None:
    rc = deployment.run({**RUN, "out-dir": str(tmp_path), "round-timeout": 120.0}, timeout=240, name="run-ok")
    assert rc == 0, deployment.log_text("run-ok")[-3000:]
    store = RunStore(tmp_path)
    records = store.read_metrics()
    assert [r["server_round"] for r in records] == [1, 2], deployment.log_text("run-ok")[-3000:]
    for r in records:
        assert (r["num_aggregated"], r["num_failed"], r["clients"]) == (3, 0, [0, 1, 2])
        assert r["reported_malicious"] == [2] and 0.0 <= r["accuracy"] <= 100.0
    checkpoint = store.load_checkpoint()
    assert checkpoint is not None and checkpoint["round"] == 2 and sorted(checkpoint["teachers"]) == ["0", "1", "2"]
    assert (tmp_path / "summary.json").exists()
    assert "round 2/2" in deployment.log_text("run-ok")


def test_the_run_completes_when_a_supernode_is_killed_mid_round(deployment: LocalDeployment, tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    log_before = deployment.log_text("supernode-0").count("Start `flwr-clientapp` process")
    proc = deployment.submit({**RUN, "out-dir": str(tmp_path), "round-timeout": 40.0}, name="run-kill")
    wait_for(lambda: len(store.read_metrics()) >= 1, 180, "round 1")
    # round 2 is under way once SuperNode 0 has started its ClientApp for it: kill it (and that ClientApp) now
    wait_for(
        lambda: deployment.log_text("supernode-0").count("Start `flwr-clientapp` process") >= log_before + 2,
        60,
        "SuperNode 0 to start training in round 2",
    )
    deployment.kill_node(0)
    assert proc.wait(timeout=180) == 0, deployment.log_text("run-kill")[-3000:]
    first, second = store.read_metrics()
    assert (first["num_aggregated"], first["num_failed"]) == (3, 0)
    assert (second["num_aggregated"], second["num_failed"], second["clients"]) == (2, 1, [1, 2])
    assert "accuracy" in second and store.load_checkpoint()["round"] == 2  # type: ignore[index]
