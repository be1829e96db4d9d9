"""Small runs shared by the attack tests: a synthetic federation of 4 clients, 2 of them attackers."""

from __future__ import annotations

import functools
from typing import Any

import torch

from spmc import make_experiment
from spmc.simulation import Simulation

SMALL: dict[str, Any] = {
    "dataset": "synthetic",
    "synthetic_train_size": 600,
    "synthetic_test_size": 100,
    "batch_size": 16,
    "num_clients": 4,
    "gamma": 0.5,
    "rounds": 2,
    "baseline_local_epochs": 1,
    "device": "cpu",
    "engine": "batched",
    "kernel": "torch",
}


def run(attack: str, **overrides: Any) -> tuple[Simulation, list[dict[str, Any]]]:
    """A simulation of ``attack`` on :data:`SMALL` and its round records (cached per process: read them only)."""
    return _run(attack, tuple(sorted(overrides.items())))


@functools.cache
def _run(attack: str, overrides: tuple[tuple[str, Any], ...]) -> tuple[Simulation, list[dict[str, Any]]]:
    sim = Simulation(make_experiment(**{**SMALL, "attack": attack, **dict(overrides)}))
    return sim, [sim.run_round(t) for t in range(sim.cfg.rounds)]


def asr_on(sim: Simulation, other: Simulation) -> float:
    """The ASR of ``sim``'s global model on ``other``'s backdoor test set (non-target rows)."""
    saved = sim.data.backdoor_x, sim.data.backdoor_y, sim.data.backdoor_not_target
    sim.data.backdoor_x, sim.data.backdoor_y = other.data.backdoor_x, other.data.backdoor_y
    sim.data.backdoor_not_target = other.data.backdoor_not_target
    try:
        return float(sim.evaluate()["asr_excl_target"])
    finally:
        sim.data.backdoor_x, sim.data.backdoor_y, sim.data.backdoor_not_target = saved


def states_differ(a: Simulation, b: Simulation) -> bool:
    return not torch.equal(a.global_state, b.global_state)
