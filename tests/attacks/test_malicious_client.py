"""The threat-model option ``malicious_client`` (spec §4.5): attackers run the configured client procedure
(``defense``), plain SGD (``plain``) or SPMC's procedure whatever the benign clients run (``spmc``, an ablation that
isolates the attackers' own projection), in the simulator on both engines and over Flower."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from spmc import make_experiment
from spmc.simulation import Simulation

from ._training import SMALL as TINY

SMALL: dict[str, Any] = {
    **TINY,
    "spmc_local_epochs": 1,
    "defense": "fedavg",
    "attack": "badnets",
}  # attackers 2, 3


@pytest.mark.parametrize(
    ("client", "malicious_client", "methods"),
    [
        ("plain", "defense", ["plain"] * 4),
        ("spmc", "defense", ["spmc"] * 4),
        ("spmc", "plain", ["spmc", "spmc", "plain", "plain"]),
        ("plain", "spmc", ["plain", "plain", "spmc", "spmc"]),
        ("spmc", "spmc", ["spmc"] * 4),
    ],
)
def test_each_client_runs_the_procedure_of_its_threat_model(
    client: str, malicious_client: str, methods: list[str]
) -> None:
    sim = Simulation(make_experiment(**SMALL, client=client, malicious_client=malicious_client))
    tasks = sim.tasks(0, [0, 1, 2, 3])
    assert [t.method for t in tasks] == methods
    assert [t.teacher is not None for t in tasks] == [m == "spmc" for m in methods]


def test_attackers_alone_run_spmc_outside_attack_rounds_they_train_plain() -> None:
    sim = Simulation(make_experiment(**SMALL, client="plain", malicious_client="spmc", attack_start=1))
    assert [t.method for t in sim.tasks(0, [0, 1, 2, 3])] == ["plain"] * 4
    assert [t.method for t in sim.tasks(1, [0, 1, 2, 3])] == ["plain", "plain", "spmc", "spmc"]


@pytest.mark.parametrize("engine", ["batched", "sequential"])
def test_only_the_attackers_states_change(engine: str) -> None:
    """Round 0 from the same θ^0 and seeds: under ``malicious_client = spmc`` the benign clients return exactly
    their all-plain states and the attackers other states; the attackers get the server's teachers in round 1."""

    def round0(**extra: Any) -> tuple[Simulation, dict[int, torch.Tensor]]:
        sim = Simulation(make_experiment(**{**SMALL, "engine": engine}, client="plain", **extra))
        results = sim.engine.train_round(sim.global_state, sim.tasks(0, [0, 1, 2, 3]))
        return sim, {r.client_id: r.state for r in results}

    _, plain = round0()
    sim, mixed = round0(malicious_client="spmc")
    assert all(torch.equal(plain[k], mixed[k]) for k in (0, 1))
    assert not any(torch.equal(plain[k], mixed[k]) for k in (2, 3))
    sim.run_round(0)
    teachers = [t.teacher for t in sim.tasks(1, [0, 1, 2, 3])]
    assert teachers[0] is None and teachers[1] is None
    assert teachers[2] is not None and not torch.equal(teachers[2], sim.global_state)  # the coalition, not θ_g


def test_batched_and_sequential_agree() -> None:
    states = []
    for engine in ("batched", "sequential"):
        sim = Simulation(make_experiment(**{**SMALL, "engine": engine}, client="plain", malicious_client="spmc"))
        sim.run_round(0)
        states.append(sim.global_state)
    assert torch.allclose(states[0], states[1], atol=1e-5)


def test_flower_sends_teachers_when_any_client_runs_spmc() -> None:
    """The strategy sends teachers when the benign or the malicious clients run SPMC's procedure (the nodes'
    procedure: ``test_client_app_trains_plain`` in tests/attacks/test_spmc_skip.py)."""
    pytest.importorskip("flwr")
    from spmc.flower.options import FlowerOptions
    from spmc.flower.server_app import build_server, build_strategy

    cases = [("plain", "defense", False), ("plain", "spmc", True), ("spmc", "plain", True)]
    for client, malicious_client, sends in cases:
        cfg = make_experiment(**SMALL, client=client, malicious_client=malicious_client)
        assert build_strategy(build_server(cfg), FlowerOptions()).send_teachers is sends
