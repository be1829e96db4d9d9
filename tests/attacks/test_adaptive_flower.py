"""``spmc_skip`` and ``coalition_mimic`` over Flower (ATTACKS.md §A5): the ServerApp and ClientApp logic run in one
process over the stand-in Grid of ``test_knowledge_flower``; with the SPMC client and defense the strategy hands
the crafting step the teachers it sends (none in round 1: θ_g, as the engine's θ⁰), and two rounds equal the
engine's (sequential engine, as the ClientApp trains)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Message  # noqa: E402

from spmc import make_experiment  # noqa: E402
from spmc.flower import parse_run_config, run_server  # noqa: E402
from spmc.flower.strategy import SHADOW_KEY  # noqa: E402
from spmc.simulation import Simulation  # noqa: E402
from spmc.store import RunStore  # noqa: E402

from ._flower_grid import Handler, StandInGrid  # noqa: E402
from ._flower_grid import node as grid_node  # noqa: E402

K = 4
TINY: dict[str, Any] = {
    "dataset": "synthetic",
    "synthetic_train_size": 320,
    "synthetic_test_size": 50,
    "num_clients": K,
    "gamma": 0.5,  # attackers 2 and 3
    "baseline_local_epochs": 1,
    "spmc_local_epochs": 1,
    "batch_size": 32,
    "device": "cpu",
    "defense": "spmc",
    "client": "spmc",
    "attack": "badnets",
}

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def node(pid: int, options: dict[str, Any], replies: list[Message]) -> Handler:
    return grid_node(pid, options, replies, K)


@pytest.mark.parametrize("attack", ["spmc_skip", "coalition_mimic"])
def test_two_rounds_over_flower_equal_the_engine(tmp_path, attack: str) -> None:
    options = {**TINY, "update_attack": attack}
    replies: list[Message] = []
    grid = StandInGrid({700 + k: node(k, options, replies) for k in range(K)})
    cfg, opts = parse_run_config({}, {**options, "rounds": 2, "round-timeout": 5.0, "out-dir": str(tmp_path)})
    run_server(grid, cfg, opts)
    shadows = {int(r.content.metric_records["metrics"]["partition-id"]): SHADOW_KEY in r.content for r in replies}
    assert shadows == {0: False, 1: False, 2: attack == "coalition_mimic", 3: attack == "coalition_mimic"}
    checkpoint = RunStore(tmp_path).load_checkpoint()
    assert checkpoint is not None and checkpoint["round"] == 2
    engine = Simulation(make_experiment(**options, rounds=2, engine="sequential")).run()
    assert torch.equal(checkpoint["global_state"], engine.global_state)
    flower_scores = [r["scores"] for r in RunStore(tmp_path).read_metrics()]
    assert flower_scores == [r["scores"] for r in engine.records]
