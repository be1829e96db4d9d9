"""The ServerApp and ClientApp logic in one process, over a stand-in Grid that hands each message to spmc's
ClientApp handlers: SPMC rounds equal the engine's, resuming after a stop (with new node ids) equals an
uninterrupted run, nodes that never answer are left out, and the node config's malicious flag is honoured."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from spmc import make_experiment  # noqa: E402
from spmc.flower import client_app, parse_run_config, run_server  # noqa: E402
from spmc.simulation import Simulation  # noqa: E402
from spmc.store import RunStore  # noqa: E402
from tests.attacks._flower_grid import Handler, StandInGrid  # noqa: E402

K = 4
TINY = {
    "dataset": "synthetic",
    "synthetic_train_size": 400,
    "synthetic_test_size": 100,
    "num_clients": K,
    "gamma": 0.25,
    "baseline_local_epochs": 1,
    "spmc_local_epochs": 1,
    "batch_size": 32,
    "device": "cpu",
    "defense": "spmc",
    "client": "spmc",
}


def node(pid: int, node_config: dict | None = None, silent: bool = False) -> Handler:
    """spmc's ClientApp handlers for partition ``pid`` of K."""
    config = {"partition-id": pid, "num-partitions": K, **(node_config or {})}

    def handle(msg: Message) -> Message | None:
        if silent:
            return None
        ctx = Context(run_id=1, node_id=msg.metadata.dst_node_id, node_config=config, state=RecordDict(), run_config={})
        if msg.metadata.message_type == "query":
            return client_app.query(msg, ctx)
        return client_app.train(msg, ctx, TINY)

    return handle


pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.fixture(scope="module")
def reference() -> Simulation:
    """The engine's 2-round SPMC run (sequential engine, as the ClientApp trains)."""
    sim = Simulation(make_experiment(**TINY, rounds=2, engine="sequential"))
    sim.records = [sim.run_round(t) for t in range(2)]  # type: ignore[attr-defined]
    return sim


def serve(grid: Grid, rounds: int, **flower: object) -> None:
    cfg, opts = parse_run_config({}, {**TINY, "rounds": rounds, "round-timeout": 5.0, **flower})  # type: ignore[dict-item]
    run_server(grid, cfg, opts)


def test_spmc_rounds_over_the_grid_equal_the_engine(reference: Simulation, tmp_path) -> None:
    grid = StandInGrid({7000 + 13 * k: node(k) for k in range(K)})
    serve(grid, 2, **{"out-dir": str(tmp_path)})
    store = RunStore(tmp_path)
    records = store.read_metrics()
    assert [r["server_round"] for r in records] == [1, 2]
    assert [r["accuracy"] for r in records] == [r["accuracy"] for r in reference.records]  # type: ignore[attr-defined]
    assert [r["asr"] for r in records] == [r["asr"] for r in reference.records]  # type: ignore[attr-defined]
    checkpoint = store.load_checkpoint()
    assert checkpoint is not None and checkpoint["round"] == 2
    assert torch.equal(checkpoint["global_state"], reference.global_state)
    for k in range(K):
        assert torch.equal(checkpoint["teachers"][str(k)], reference.teachers[k])
    assert {m for _, m in grid.sent} == {"train"}  # known nodes: no identification query
    summary = (tmp_path / "summary.json").read_text()
    assert '"rounds": 2' in summary and '"V"' in summary


def test_resume_with_new_node_ids_equals_an_uninterrupted_run(reference: Simulation, tmp_path) -> None:
    serve(StandInGrid({100 + k: node(k) for k in range(K)}), 1, **{"out-dir": str(tmp_path)})
    restarted = StandInGrid({200 + k: node(k) for k in range(K)})  # SuperNodes restarted: unknown node ids
    serve(restarted, 2, **{"out-dir": str(tmp_path)})
    assert sorted(restarted.sent) == sorted(
        [(200 + k, "query") for k in range(K)] + [(200 + k, "train") for k in range(K)]
    )
    store = RunStore(tmp_path)
    checkpoint = store.load_checkpoint()
    assert checkpoint is not None and checkpoint["round"] == 2
    assert torch.equal(checkpoint["global_state"], reference.global_state)
    assert [r["server_round"] for r in store.read_metrics()] == [1, 2]


def test_nodes_that_never_answer_are_left_out(tmp_path) -> None:
    handlers = {10 + k: node(k, silent=(k == 1)) for k in range(K)}
    serve(StandInGrid(handlers), 1, **{"out-dir": str(tmp_path), "round-timeout": 0.5, "poll-interval": 0.05})
    (record,) = RunStore(tmp_path).read_metrics()
    assert (record["num_aggregated"], record["num_failed"], record["failed_nodes"]) == (3, 1, [11])
    assert record["clients"] == [0, 2, 3]


@pytest.mark.parametrize("pid, flag, expected", [(0, "true", True), (3, "false", False), (3, None, True)])
def test_node_config_malicious_flag(pid: int, flag: str | None, expected: bool) -> None:
    config = {"partition-id": pid, "num-partitions": K} | ({} if flag is None else {"malicious": flag})
    ctx = Context(run_id=1, node_id=1, node_config=config, state=RecordDict(), run_config={})
    setup = client_app.client_setup(ctx, TINY)
    assert setup.malicious is expected
    assert setup.data.final is expected  # poisoned data are frozen (poison_static_aug), clean data transformed


def test_a_second_server_on_a_locked_run_directory_is_refused(tmp_path) -> None:
    from spmc.store import RunLock, RunLockedError

    grid = StandInGrid({100 + k: node(k) for k in range(K)})
    with RunLock(tmp_path), pytest.raises(RunLockedError, match="in use by process"):
        serve(grid, 1, **{"out-dir": str(tmp_path)})
    assert grid.sent == [] and not (tmp_path / "metrics.jsonl").exists()
