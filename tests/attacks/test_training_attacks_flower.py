"""The training-hook attacks in Flower: the strategy crafts (PGD's final projection) and checkpoints the crafting
attack's state; one round of each through Flower's simulation (slow: Ray)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("flwr")

from flwr.app import Message, MessageType, MetricRecord, RecordDict  # noqa: E402

from spmc.attacks import Crafter  # noqa: E402
from spmc.attacks.pgd import PGD, update_norms  # noqa: E402
from spmc.defenses import DEFENSES  # noqa: E402
from spmc.flower import DefenseStrategy, state_to_arrays  # noqa: E402
from spmc.params import ParamLayout  # noqa: E402
from spmc.store import RunStore  # noqa: E402

LAYOUT = ParamLayout.from_module(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))  # with an integer counter

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def reply(state: torch.Tensor, node: int, pid: int) -> Message:
    ins = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    metrics = MetricRecord({"num-examples": 10, "train-loss": 1.0, "partition-id": pid})
    return Message(RecordDict({"arrays": state_to_arrays(LAYOUT, state), "metrics": metrics}), reply_to=ins)


def strategy() -> DefenseStrategy:
    attack = PGD()
    attack.bind(LAYOUT)
    crafter = Crafter(attack, frozenset({2}))
    return DefenseStrategy(DEFENSES["fedavg"](), LAYOUT, initial_state=torch.zeros(LAYOUT.dim), crafter=crafter)


def test_strategy_crafts_and_checkpoints_the_learned_radius() -> None:
    s = strategy()
    floats = LAYOUT.stat_mask()
    states = torch.zeros(3, LAYOUT.dim)
    states[0, floats], states[1, floats] = 0.1, 0.3  # benign update norms 0.1·√F and 0.3·√F
    states[2, floats] = 5.0  # the attacker, far outside
    s.aggregate_train(1, [reply(states[k], node=10 + k, pid=k) for k in range(3)])
    norms = update_norms(states[:2], torch.zeros(LAYOUT.dim), floats)
    expected = float(norms.mean())  # the median of two
    assert isinstance(s.core.crafter, Crafter)
    attack = s.core.crafter.attack
    assert isinstance(attack, PGD) and attack.eps == pytest.approx(expected)
    # round 0 in Flower: the aggregate holds the attacker projected onto the benign median (FedAvg of equal weights)
    sent = (s.global_state * 3 - states[0] - states[1])[floats]
    assert float(torch.linalg.vector_norm(sent.double())) == pytest.approx(expected, rel=1e-4)
    payload = s.state_dict(1)
    assert float(payload["attack_state"]["update.eps"]) == pytest.approx(expected)
    restored = strategy()
    assert restored.load_state_dict(payload) == 1
    assert isinstance(restored.core.crafter, Crafter) and restored.core.crafter.attack.state_dict().keys() == {"eps"}
    assert float(restored.core.crafter.attack.state_dict()["eps"]) == pytest.approx(expected)


TINY = {
    "dataset": "synthetic",
    "synthetic_train_size": 200,
    "synthetic_test_size": 50,
    "num_clients": 4,
    "gamma": 0.25,
    "rounds": 1,
    "baseline_local_epochs": 1,
    "batch_size": 16,
    "device": "cpu",
}


@pytest.mark.slow  # Ray starts a local cluster per run
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("attack", ["pgd", "constrain_scale", "neurotoxin"])
def test_one_round_in_flower_simulation(tmp_path, attack: str) -> None:
    from flwr.simulation import run_simulation

    from spmc.flower import make_client_app, make_server_app

    options = {**TINY, "update_attack": attack}
    run_simulation(
        server_app=make_server_app({**options, "out-dir": str(tmp_path), "resume": False}),
        client_app=make_client_app({**options, "threads": 1}),
        num_supernodes=4,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    store = RunStore(tmp_path)
    (record,) = store.read_metrics()
    assert (record["server_round"], record["num_aggregated"], record["reported_malicious"]) == (1, 4, [3])
    checkpoint = store.load_checkpoint()
    assert checkpoint is not None and checkpoint["round"] == 1
    if attack != "constrain_scale":  # PGD's learned radius is checkpointed by the strategy
        assert float(checkpoint["attack_state"]["update.eps"]) > 0
