"""The update attacks of ATTACKS.md §A4 in the Flower strategy (crafting acts there, where the server sees every
reply): on the same client states the strategy's global model equals the simulation engine's."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Message, MessageType, MetricRecord, RecordDict  # noqa: E402

from spmc import make_experiment  # noqa: E402
from spmc.config import build_attack, build_defense  # noqa: E402
from spmc.flower import DefenseStrategy, arrays_to_state, state_to_arrays  # noqa: E402
from spmc.params import ParamLayout  # noqa: E402
from spmc.simulation import Simulation  # noqa: E402
from spmc.training import ClientResult  # noqa: E402

SMALL = {
    "dataset": "synthetic",
    "synthetic_train_size": 600,
    "synthetic_test_size": 100,
    "batch_size": 32,
    "device": "cpu",
    "engine": "sequential",
}


def reply(layout: ParamLayout, state: torch.Tensor, node: int, pid: int, num: float) -> Message:
    """A train reply from ``node`` as a ClientApp sends it (as in ``tests/test_flower_strategy.py``)."""
    ins = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    metrics = MetricRecord({"num-examples": num, "train-loss": 1.0, "partition-id": pid})
    return Message(RecordDict({"arrays": state_to_arrays(layout, state), "metrics": metrics}), reply_to=ins)


pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.mark.parametrize("attack", ["scaling", "lie", "min_max", "min_sum", "ipm", "sign_flip", "gaussian"])
def test_strategy_crafts_like_the_engine(attack: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_experiment(**{**SMALL, "num_clients": 5, "gamma": 0.4}, attack="none", update_attack=attack)
    sim = Simulation(cfg)
    assert sim.data.malicious == (3, 4)
    g = torch.Generator().manual_seed(2)
    states = {k: sim.global_state + 0.01 * torch.randn(sim.layout.dim, generator=g) for k in range(5)}
    monkeypatch.setattr(
        sim.engine,
        "train_round",
        lambda start, tasks: [ClientResult(t.client_id, states[t.client_id].clone(), 1.0, 1) for t in tasks],
    )
    strategy = DefenseStrategy(
        build_defense(cfg),
        sim.layout,
        send_teachers=False,
        initial_state=sim.global_state.clone(),
        crafter=build_attack(cfg).crafter(),
    )
    replies = [
        reply(sim.layout, states[k], node=700 - 13 * k, pid=k, num=sim.data.num_samples[k]) for k in (4, 1, 3, 0, 2)
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    start = sim.global_state.clone()
    sim.run_round(0)
    assert arrays is not None
    assert torch.allclose(arrays_to_state(sim.layout, arrays), sim.global_state, atol=1e-7, rtol=0)
    clean = torch.stack([states[k] for k in range(5)]).mean(0)
    assert not torch.allclose(sim.global_state, clean, atol=1e-6)  # the attackers' rows were crafted
    assert not torch.equal(sim.global_state, start)
