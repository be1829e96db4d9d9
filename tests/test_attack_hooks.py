"""The attack registry's three hooks (ATTACKS.md §A2) on both engines, the schedule and the attacker pool (§A1)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch

from spmc import make_experiment
from spmc.attacks import (
    ATTACKS,
    Attack,
    AttackSchedule,
    Crafter,
    CraftingInputs,
    attacker_pool,
)
from spmc.attacks.base import Hook
from spmc.batched import BatchedEngine
from spmc.config import ConfigError, Experiment
from spmc.simulation import Simulation, optim_config
from spmc.training import ClientResult, SequentialEngine

GAMMA = 4.0
SMALL = {
    "dataset": "synthetic",
    "synthetic_train_size": 600,
    "batch_size": 16,
    "synthetic_test_size": 50,
    "num_clients": 4,
    "gamma": 0.5,
    "rounds": 2,
    "baseline_local_epochs": 1,
    "weight_decay": 0.0,  # a zero gradient leaves a tensor exactly where it was
    "device": "cpu",
    "engine": "batched",
    "kernel": "torch",
}


class FreezeConv1(Attack):
    """Training hook: the attackers' gradient of ``conv1.weight`` is zeroed at every local step."""

    name: ClassVar[str] = "test-freeze"
    description: ClassVar[str] = "zero the conv1.weight gradient"
    hooks: ClassVar[frozenset[Hook]] = frozenset({"training"})
    columns: ClassVar[slice] = slice(0, 0)

    def gradient(self, grad: torch.Tensor, rows: torch.Tensor, global_state: torch.Tensor) -> torch.Tensor:
        grad[:, self.columns] = 0.0
        return grad


class Scale(Attack):
    """Crafting hook: θ̃ = θ_g + Γ·(θ_k − θ_g) for every attacker."""

    name: ClassVar[str] = "test-scale"
    description: ClassVar[str] = "scale the attackers' updates by Γ"
    hooks: ClassVar[frozenset[Hook]] = frozenset({"crafting"})

    def craft(self, inputs: CraftingInputs) -> torch.Tensor:
        g = inputs.global_state
        return g + GAMMA * (inputs.attacker_states - g)


class Poisonous(Attack):
    """Crafting hook that sends NaN: the update guard must refuse it."""

    hooks: ClassVar[frozenset[Hook]] = frozenset({"crafting"})

    def craft(self, inputs: CraftingInputs) -> torch.Tensor:
        return torch.full_like(inputs.attacker_states, float("nan"))


def simulation(update: Attack | None = None, **overrides: object) -> Simulation:
    sim = Simulation(make_experiment(**{**SMALL, **overrides}))
    fed = sim.federation
    fed.attack = dataclasses.replace(fed.attack, update=update)
    sim.core.crafter = fed.crafter()
    return sim


def both_engines(sim: Simulation, t: int) -> tuple[list[ClientResult], list[ClientResult]]:
    tasks = sim.tasks(t, sim.participants(t))
    sequential = SequentialEngine(sim.model, sim.layout, optim_config(sim.cfg)).train_round(sim.global_state, tasks)
    assert isinstance(sim.engine, BatchedEngine)
    return sequential, sim.engine.train_round(sim.global_state, tasks)


def test_registry_names_and_alias() -> None:
    assert ATTACKS["base"] is ATTACKS["badnets"]
    assert ATTACKS["badnets"].hooks == {"data"} and ATTACKS["semantic"].hooks == {"data"}
    assert ATTACKS["none"].hooks == frozenset()
    assert make_experiment(attack="badnets").malicious_ids == make_experiment(attack="base").malicious_ids


def test_training_hook_masks_the_attackers_gradient_on_both_engines() -> None:
    sim = simulation(FreezeConv1())
    entry = next(e for e in sim.layout.entries if e.name == "conv1.weight")
    FreezeConv1.columns = entry.slice
    sequential, batched = both_engines(sim, 0)
    start = sim.global_state
    for s, b in zip(sequential, batched):
        assert torch.allclose(s.state, b.state, atol=1e-6, rtol=1e-5)
        frozen = torch.equal(s.state[entry.slice], start[entry.slice])
        assert frozen == (s.client_id in sim.data.malicious), s.client_id
        assert torch.equal(b.state[entry.slice], start[entry.slice]) == frozen
        assert float((s.state - start).abs().max()) > 1e-4  # the other tensors trained


def test_crafting_hook_scales_the_attackers_updates_on_both_engines() -> None:
    outcomes = []
    for engine_results in both_engines(simulation(Scale()), 0):
        sim = simulation(Scale())
        start = sim.global_state.clone()
        ids = [r.client_id for r in engine_results]
        outcome = sim.core.step(0, [r.state for r in engine_results], ids, [1.0] * len(ids))
        assert outcome.states is not None and outcome.kept_ids == tuple(ids)
        for row, r in zip(outcome.states, engine_results):
            expected = start + GAMMA * (r.state - start) if r.client_id in sim.data.malicious else r.state
            assert torch.allclose(row, expected, atol=1e-6)
        outcomes.append(sim.global_state)
    assert torch.allclose(outcomes[0], outcomes[1], atol=1e-6, rtol=1e-5)


def test_crafted_states_pass_the_update_guard() -> None:
    sim = simulation(Poisonous())
    results = sim.engine.train_round(sim.global_state, sim.tasks(0, sim.participants(0)))
    ids = [r.client_id for r in results]
    outcome = sim.core.step(0, [r.state for r in results], ids, [1.0] * len(ids))
    assert sorted(outcome.refused) == list(sim.data.malicious) == [2, 3]
    assert outcome.kept_ids == (0, 1)


def test_crafting_sees_the_benign_states_under_full_knowledge() -> None:
    seen: list[CraftingInputs] = []

    class Spy(Scale):
        def craft(self, inputs: CraftingInputs) -> torch.Tensor:
            seen.append(inputs)
            return inputs.attacker_states

    states = [torch.full((3,), float(k)) for k in range(4)]
    crafter = Crafter(Spy(), frozenset({1, 3}), AttackSchedule(start=1))
    assert crafter(0, torch.zeros(3), states, [0, 1, 2, 3]) == states and not seen  # round 0: no attack
    crafter(1, torch.zeros(3), states, [0, 1, 2, 3])
    (inputs,) = seen
    assert inputs.attacker_ids == (1, 3) and inputs.benign_ids == (0, 2) and inputs.round == 1
    assert inputs.attacker_states[:, 0].tolist() == [1.0, 3.0] and inputs.benign_states[:, 0].tolist() == [0.0, 2.0]


@pytest.mark.parametrize(
    ("schedule", "rounds"),
    [
        (AttackSchedule(), list(range(8))),
        (AttackSchedule(start=2, end=6, every=2), [2, 4, 6]),
        (AttackSchedule(start=3, end=3), [3]),
        (AttackSchedule(start=5, every=3), [5]),
    ],
)
def test_schedule(schedule: AttackSchedule, rounds: list[int]) -> None:
    assert [t for t in range(8) if schedule.active(t)] == rounds


def test_attackers_train_on_clean_data_outside_attack_rounds() -> None:
    sim = simulation(FreezeConv1(), attack_start=1, attack_every=2)
    for t, attacking in ((0, False), (1, True), (2, False), (3, True)):
        for task in sim.tasks(t, sim.participants(t)):
            bad = task.client_id in sim.data.malicious
            assert (task.training is not None) == (bad and attacking)
            poisoned = task.data is sim.data.clients[task.client_id] and task.client_id in sim.data.clean
            assert poisoned == (bad and attacking), (t, task.client_id)


def test_random_attacker_pool_is_seeded_and_deterministic() -> None:
    pools = {seed: attacker_pool(10, 0.3, "random", seed) for seed in range(6)}
    assert all(len(p) == 3 and len(set(p)) == 3 and all(0 <= k < 10 for k in p) for p in pools.values())
    assert pools[4] == attacker_pool(10, 0.3, "random", 4)
    assert len(set(pools.values())) > 1
    assert attacker_pool(10, 0.3, "fixed", 4) == (7, 8, 9)
    cfg = make_experiment(**{**SMALL, "attacker_pool": "random", "seed": 4, "num_clients": 10, "gamma": 0.3})
    assert cfg.malicious_ids == pools[4]
    assert make_experiment(attack="none", attacker_pool="random").malicious_ids == ()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"attack": "nope"}, "attack"),
        ({"update_attack": "badnets"}, "update_attack"),
        ({"attack_start": 3, "attack_end": 2}, "attack_end = 2 is before attack_start = 3"),
        ({"attack_end": 50}, r"attack_end = 50 is not a round of the run \(rounds = 50: rounds 0 … 49\)"),
        ({"attack_start": 60}, r"attack_start = 60 is not a round of the run \(rounds = 50"),
        ({"attack_every": 0}, "attack_every"),
        ({"attacker_pool": "some"}, "attacker_pool"),
        ({"attacker_knowledge": "some"}, "attacker_knowledge"),
    ],
)
def test_threat_model_options_are_validated(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        make_experiment(**values)
    assert "Traceback" not in str(err.value)


def test_update_attack_alone_makes_attackers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ATTACKS, "test-scale", Scale)
    assert Experiment(attack="none", num_clients=10, gamma=0.2).malicious_ids == ()
    cfg = make_experiment(**{**SMALL, "attack": "none", "update_attack": "test-scale", "num_clients": 10, "gamma": 0.2})
    assert cfg.malicious_ids == (8, 9)
    sim = Simulation(cfg)
    assert sim.data.clean == {} and sim.core.crafter is not None
    assert isinstance(sim.federation.attack.update, Scale)
