"""Shared helpers of the training-hook attack tests (pgd, constrain_scale, neurotoxin): a tiny synthetic run with a
given update attack, and one round trained on both engines."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from spmc import make_experiment
from spmc.attacks import Attack
from spmc.batched import BatchedEngine
from spmc.simulation import Simulation, optim_config
from spmc.training import ClientResult, SequentialEngine

SMALL: dict[str, Any] = {
    "dataset": "synthetic",
    "synthetic_train_size": 200,
    "batch_size": 16,
    "synthetic_test_size": 50,
    "num_clients": 4,
    "gamma": 0.5,
    "rounds": 2,
    "baseline_local_epochs": 1,
    "device": "cpu",
    "engine": "batched",
    "kernel": "torch",
    "threads": 1,
}


def simulation(update: Attack | None, **overrides: Any) -> Simulation:
    """A tiny batched run (attackers 2 and 3) whose update attack is ``update`` (bound to the model's layout)."""
    sim = Simulation(make_experiment(**{**SMALL, **overrides}))
    fed = sim.federation
    if update is not None:
        update.bind(fed.layout)
    fed.attack = dataclasses.replace(fed.attack, update=update)
    sim.core.crafter = fed.crafter()
    return sim


def both_engines(sim: Simulation, t: int) -> tuple[list[ClientResult], list[ClientResult]]:
    """Round ``t``'s local training (after the attacks observed θ_g) on the sequential and the batched engine."""
    ids = sim.participants(t)
    sim.federation.prepare_round(t, sim.global_state, ids)
    tasks = sim.tasks(t, ids)
    sequential = SequentialEngine(sim.model, sim.layout, optim_config(sim.cfg)).train_round(sim.global_state, tasks)
    assert isinstance(sim.engine, BatchedEngine)
    return sequential, sim.engine.train_round(sim.global_state, tasks)


def assert_same(sequential: list[ClientResult], batched: list[ClientResult]) -> None:
    """The engines' states agree to float tolerance, client by client."""
    assert [r.client_id for r in sequential] == [r.client_id for r in batched]
    for s, b in zip(sequential, batched):
        assert torch.allclose(s.state, b.state, atol=1e-5, rtol=1e-4), s.client_id
        assert abs(s.mean_loss - b.mean_loss) < 1e-4


def update_norm(state: torch.Tensor, start: torch.Tensor) -> float:
    """‖θ − θ_g‖₂ in float64."""
    return float(torch.linalg.vector_norm(state.double() - start.double()))
