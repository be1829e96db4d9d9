"""``lie``: "A Little Is Enough" (Baruch, Baruch, Goldberg, NeurIPS 2019, arXiv 1902.06156, §3; ATTACKS.md §A4).

With μ_j and σ_j the per-coordinate mean and standard deviation of the benign updates u_i = θ_i − θ_g, every
attacker sends the same state

    θ̃ = θ_g + μ − z·σ,    z = Φ⁻¹((K − s)/K),    s = ⌊K/2 + 1⌋ − m,

Φ the standard normal CDF; ``lie_z`` overrides z. s is the number of benign clients the attackers need on their side
for a majority; z the largest deviation such that s benign clients are farther from the mean than the attackers.

Choices where the source is loose:

* K and m are counted **in the round**: K = benign + attackers in :class:`~spmc.attacks.CraftingInputs`, m = the
  attackers among them (the paper's n and m are the workers that answer the aggregation); under
  ``attacker_knowledge = partial`` the attackers do not see who else answers (``benign_ids`` is empty and the benign
  rows are their own clean estimates), so K is the run's ``num_clients``
  (:func:`spmc.attacks.crafting.round_clients`);
* when the attackers are a majority of the round (s ≤ 0, so (K − s)/K ≥ 1 and Φ⁻¹ = ∞) s is taken as 1, the
  largest finite z = Φ⁻¹((K − 1)/K) (as public implementations do); s ≥ 1 also keeps z ≥ 0 for m ≥ 1;
* σ is the **sample** standard deviation (correction 1): the authors' code and the public implementations use
  ``torch.std``; σ = 0 with a single benign update;
* the benign set is ``benign_states`` (the attackers' clean estimates under ``attacker_knowledge = partial``); with
  no benign client in the round the attackers' own updates are the estimate;
* μ and σ are computed in float64 over column blocks, the result is cast back to the states' dtype.

Worked case (K = 10, m = 3): s = ⌊6⌋ − 3 = 3, z = Φ⁻¹(0.7) ≈ 0.5244. The update guard never refuses it: ‖μ − zσ‖
is on the scale of a benign update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import ClassVar

import torch

from spmc.attacks.base import Attack, CraftingInputs, Hook
from spmc.attacks.crafting import (
    benign_set,
    block_updates,
    column_blocks,
    mean_std,
    repeat_rows,
    round_clients,
    to_states,
)
from spmc.options import option


@dataclass(frozen=True)
class LieOptions:
    """z of the attack (None: Φ⁻¹((K − s)/K) of the round)."""

    z: float | None = option(
        None, key="lie_z", help="LIE's deviation z in standard deviations; None = Φ⁻¹((K − s)/K) (Baruch 2019 §3)"
    )

    def __post_init__(self) -> None:
        if self.z is not None and (isinstance(self.z, bool) or not math.isfinite(self.z)):
            raise ValueError(f"lie_z: got {self.z!r}; must be a finite number or None (Φ⁻¹((K − s)/K))")


def lie_z(clients: int, attackers: int) -> float:
    """z = Φ⁻¹((K − s)/K), s = max(⌊K/2 + 1⌋ − m, 1), for K = ``clients`` ≥ 1 and m = ``attackers``."""
    if clients < 1 or not 0 <= attackers <= clients:
        raise ValueError(f"lie: got K = {clients}, m = {attackers}; need K >= 1 and 0 <= m <= K")
    s = max(clients // 2 + 1 - attackers, 1)
    if s >= clients:  # K = 1 (or K = 2, m = 0): Φ⁻¹(0) = −∞; no deviation
        return 0.0
    return NormalDist().inv_cdf((clients - s) / clients)


def lie_state(benign: torch.Tensor, global_state: torch.Tensor, z: float) -> torch.Tensor:
    """θ_g + μ − z·σ over the benign states [n, d] (float64 over column blocks), in the states' dtype."""
    out = torch.empty(global_state.shape[0], dtype=torch.float64, device=global_state.device)
    for cols in column_blocks(global_state.shape[0]):
        mu, sigma = mean_std(block_updates(benign, global_state, cols))
        shift = mu if z == 0 else mu - z * sigma
        out[cols] = global_state[cols].to(torch.float64) + shift
    return to_states(out, global_state)


class Lie(Attack):
    """A Little Is Enough: every attacker sends θ_g + μ − z·σ of the benign updates."""

    name: ClassVar[str] = "lie"
    description: ClassVar[str] = "A Little Is Enough: θ_g + μ − z·σ of the benign updates (Baruch et al. 2019)"
    hooks: ClassVar[frozenset[Hook]] = frozenset({"crafting"})
    options_type: ClassVar[type[LieOptions]] = LieOptions
    options: LieOptions

    def z(self, inputs: CraftingInputs) -> float:
        """``lie_z``, or Φ⁻¹((K − s)/K) with K and m of the round (:func:`spmc.attacks.crafting.round_clients`)."""
        if self.options.z is not None:
            return float(self.options.z)
        return lie_z(round_clients(inputs, self.threat.num_clients), inputs.attacker_states.shape[0])

    def craft(self, inputs: CraftingInputs) -> torch.Tensor:
        """The same state θ_g + μ − z·σ for every attacker."""
        state = lie_state(benign_set(inputs), inputs.global_state, self.z(inputs))
        return repeat_rows(state, inputs.attacker_states.shape[0])
