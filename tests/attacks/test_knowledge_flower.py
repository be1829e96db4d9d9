"""``attacker_knowledge = partial`` over Flower (ATTACKS.md §A1): an attacker's ClientApp also trains its clean
model and returns it as the ``shadow`` ArrayRecord; the strategy passes it to the crafting step only. The ServerApp
and ClientApp logic run in one process over the stand-in Grid of ``tests/test_flower_protocol.py``, and the run
equals the engine's (sequential engine, as the ClientApp trains)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import ClassVar

import pytest
import torch

pytest.importorskip("flwr")


from flwr.app import Message, MessageType, MetricRecord, RecordDict  # noqa: E402

from spmc import make_experiment  # noqa: E402
from spmc.attacks import ATTACKS, Attack, CraftingInputs  # noqa: E402
from spmc.attacks.base import Hook  # noqa: E402
from spmc.defenses import DEFENSES  # noqa: E402
from spmc.flower import DefenseStrategy, MalformedUpdate, parse_run_config, run_server  # noqa: E402
from spmc.flower.convert import state_to_arrays  # noqa: E402
from spmc.flower.strategy import SHADOW_KEY  # noqa: E402
from spmc.simulation import Simulation  # noqa: E402
from spmc.store import RunStore  # noqa: E402

from ._flower_grid import Handler, StandInGrid  # noqa: E402
from ._flower_grid import node as grid_node  # noqa: E402

K = 4
MEAN = "test-benign-mean-flower"
TINY = {
    "dataset": "synthetic",
    "synthetic_train_size": 320,
    "synthetic_test_size": 50,
    "num_clients": K,
    "gamma": 0.5,  # attackers 2 and 3
    "baseline_local_epochs": 1,
    "batch_size": 32,
    "device": "cpu",
    "defense": "fedavg",
    "client": "plain",
    "update_attack": MEAN,
    "attacker_knowledge": "partial",
}


class BenignMean(Attack):
    """Crafting hook: every attacker sends θ_g + the mean update of the benign states it is shown."""

    name: ClassVar[str] = MEAN
    description: ClassVar[str] = "θ_g + the mean benign update (a test attack)"
    hooks: ClassVar[frozenset[Hook]] = frozenset({"crafting"})
    seen: ClassVar[list[CraftingInputs]] = []

    def craft(self, inputs: CraftingInputs) -> torch.Tensor:
        BenignMean.seen.append(inputs)
        mean = (inputs.benign_states - inputs.global_state).mean(dim=0)
        return (inputs.global_state + mean).expand_as(inputs.attacker_states).clone()


pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(ATTACKS, MEAN, BenignMean)
    BenignMean.seen = []
    yield
    BenignMean.seen = []


def node(pid: int, replies: list[Message]) -> Handler:
    return grid_node(pid, TINY, replies, K)


def test_partial_knowledge_over_flower_equals_the_engine(tmp_path) -> None:
    replies: list[Message] = []
    grid = StandInGrid({500 + k: node(k, replies) for k in range(K)})
    cfg, opts = parse_run_config({}, {**TINY, "rounds": 1, "round-timeout": 5.0, "out-dir": str(tmp_path)})
    run_server(grid, cfg, opts)
    shadows = {int(r.content.metric_records["metrics"]["partition-id"]): SHADOW_KEY in r.content for r in replies}
    assert shadows == {0: False, 1: False, 2: True, 3: True}  # only the attackers train a clean model
    (flower_inputs,) = BenignMean.seen
    assert flower_inputs.benign_ids == () and flower_inputs.attacker_ids == (2, 3)
    checkpoint = RunStore(tmp_path).load_checkpoint()
    assert checkpoint is not None
    engine = Simulation(make_experiment(**TINY, rounds=1, engine="sequential")).run()
    engine_inputs = BenignMean.seen[1]
    assert torch.equal(flower_inputs.benign_states, engine_inputs.benign_states)  # the same clean shadows
    assert torch.equal(checkpoint["global_state"], engine.global_state)
    (record,) = RunStore(tmp_path).read_metrics()
    assert record["num_aggregated"] == K and record["clients"] == [0, 1, 2, 3]  # no shadow among them


def test_a_malformed_shadow_rejects_the_reply() -> None:
    sim = Simulation(make_experiment(**TINY, rounds=1, engine="sequential"))
    layout = sim.layout
    strategy = DefenseStrategy(DEFENSES["fedavg"](), layout, initial_state=sim.global_state.clone())
    ins = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    bad = sim.global_state.clone()
    bad[0] = math.nan
    content = RecordDict(
        {
            "arrays": state_to_arrays(layout, sim.global_state),
            SHADOW_KEY: state_to_arrays(layout, bad),
            "metrics": MetricRecord({"num-examples": 10, "partition-id": 2}),
        }
    )
    with pytest.raises(MalformedUpdate, match="client 2's clean model"):
        strategy._parse(1, Message(content, reply_to=ins).content)
