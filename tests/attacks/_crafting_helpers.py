"""Shared by the update-attack tests: a CraftingInputs builder, finite-output property inputs, and one smoke round
through the configuration (``resolve("smoke", attack="none", update_attack=...)``) that returns the states the
defense received next to the states the clients trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from spmc.attacks import CraftingInputs
from spmc.config import resolve
from spmc.simulation import Simulation


def make_inputs(
    attackers: torch.Tensor,
    benign: torch.Tensor | None = None,
    global_state: torch.Tensor | None = None,
    round_index: int = 0,
    attacker_ids: tuple[int, ...] | None = None,
) -> CraftingInputs:
    """CraftingInputs: attackers [m, d], benign [n, d] (none when None), θ_g zeros unless given; benign ids 0..n-1,
    attacker ids n..n+m-1 unless given."""
    m, d = attackers.shape
    b = attackers.new_zeros(0, d) if benign is None else benign
    n = b.shape[0]
    return CraftingInputs(
        round=round_index,
        global_state=attackers.new_zeros(d) if global_state is None else global_state,
        attacker_states=attackers,
        attacker_ids=tuple(range(n, n + m)) if attacker_ids is None else attacker_ids,
        benign_states=b,
        benign_ids=tuple(range(n)),
    )


@dataclass
class SmokeRound:
    """Round 0 of a smoke run: θ_g, the ids, the trained (uncrafted) states, the states the defense received,
    the attackers, the new global state and the FedAvg of the uncrafted states."""

    global_state: torch.Tensor
    ids: list[int]
    trained: torch.Tensor
    received: torch.Tensor
    attackers: tuple[int, ...]
    new_global: torch.Tensor
    clean_global: torch.Tensor
    sim: Simulation


def smoke_round(update_attack: str, **overrides: Any) -> SmokeRound:
    """One round of ``resolve("smoke", attack="none", update_attack=...)`` (FedAvg), trained and stepped as
    :meth:`Simulation.run_round` does, keeping the states before and after crafting."""
    sim = Simulation(resolve("smoke", attack="none", update_attack=update_attack, rounds=1, **overrides))
    start = sim.global_state.clone()
    ids = sim.participants(0)
    results = sim.engine.train_round(start, sim.tasks(0, ids))
    counts = [float(sim.data.num_samples[k]) for k in ids]
    trained = torch.stack([r.state for r in results])
    outcome = sim.core.step(0, [r.state for r in results], ids, counts)
    assert outcome.states is not None and outcome.kept_ids == tuple(ids), outcome.refused
    w = torch.tensor(counts, dtype=torch.float64)
    clean = ((trained.to(torch.float64) * w[:, None]).sum(0) / w.sum()).to(trained.dtype)
    return SmokeRound(start, ids, trained, outcome.states, sim.data.malicious, sim.global_state, clean, sim)
