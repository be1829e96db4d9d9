"""``ipm``: inner-product manipulation (Xie, Koyejo, Gupta, "Fall of Empires: Breaking Byzantine-tolerant SGD by
Inner Product Manipulation", UAI 2019/2020, arXiv 1903.03936, §3; ATTACKS.md §A4).

Every attacker sends the same state

    θ̃ = θ_g − ε·μ,    μ = (1/n) Σ_i (θ_i − θ_g) over the benign updates,    ε = ``ipm_eps`` (0.1)

so that the inner product of the aggregate with the true descent direction turns negative. ε = 0.1 is the paper's
small-ε setting (it fools coordinate-wise median and Krum, the crafted update lying close to the benign ones);
ε = 100 the other published value (a large reversed step against mean-type rules). Choices: the benign set is
``benign_states`` (the attackers' clean estimates under ``partial``), the attackers' own updates when the round has
no benign client; μ in float64 over column blocks. The update guard never refuses it at ε ≤ 10⁵ (‖ε·μ‖ ≤ ε × the
largest benign norm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from spmc.attacks.base import Attack, CraftingInputs, Hook
from spmc.attacks.crafting import benign_set, block_updates, column_blocks, repeat_rows, to_states
from spmc.options import option


@dataclass(frozen=True)
class IpmOptions:
    """ε of θ_g − ε·μ."""

    eps: float = option(
        0.1, key="ipm_eps", help="IPM's ε > 0 in θ_g − ε·μ (Xie et al. UAI 2019: 0.1; 100 the other published value)"
    )

    def __post_init__(self) -> None:
        if isinstance(self.eps, bool) or not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"ipm_eps: got {self.eps!r}; must be a finite number > 0")


def ipm_state(benign: torch.Tensor, global_state: torch.Tensor, eps: float) -> torch.Tensor:
    """θ_g − ε·μ over the benign states [n, d], float64 over column blocks, in the states' dtype."""
    out = torch.empty(global_state.shape[0], dtype=torch.float64, device=global_state.device)
    for cols in column_blocks(global_state.shape[0]):
        mu = block_updates(benign, global_state, cols).mean(dim=0)
        out[cols] = global_state[cols].to(torch.float64) - eps * mu
    return to_states(out, global_state)


class Ipm(Attack):
    """Inner-product manipulation: every attacker sends θ_g − ε·μ."""

    name: ClassVar[str] = "ipm"
    description: ClassVar[str] = "inner-product manipulation: θ_g − ε·μ of the benign updates (Xie et al., UAI 2020)"
    hooks: ClassVar[frozenset[Hook]] = frozenset({"crafting"})
    options_type: ClassVar[type[IpmOptions]] = IpmOptions
    options: IpmOptions

    def craft(self, inputs: CraftingInputs) -> torch.Tensor:
        """The same state θ_g − ε·μ for every attacker."""
        state = ipm_state(benign_set(inputs), inputs.global_state, self.options.eps)
        return repeat_rows(state, inputs.attacker_states.shape[0])
