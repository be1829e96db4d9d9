"""``sign_flip``: every attacker sends its own honest update reversed (ATTACKS.md §A4; the sign-flipping Byzantine
attack of Damaskinos et al., ICML 2018, and Li et al., "RSA", AAAI 2019, with factor −1; FLPoison's ``signflipping``):

    θ̃_k = θ_g − (θ_k − θ_g)

It needs no knowledge of the benign clients. Choices: the factor is fixed at −1 (``scaling`` covers other
magnitudes); float64 arithmetic cast back with the clamp of :func:`spmc.attacks.crafting.to_states`. The reversed
update has the honest update's norm, so the update guard never refuses it.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from spmc.attacks.base import Attack, CraftingInputs, Hook
from spmc.attacks.crafting import to_states


class SignFlip(Attack):
    """Sign flip: θ_g − (θ_k − θ_g) for every attacker."""

    name: ClassVar[str] = "sign_flip"
    description: ClassVar[str] = "sign flip: the attacker's own honest update reversed, θ_g − (θ_k − θ_g)"
    hooks: ClassVar[frozenset[Hook]] = frozenset({"crafting"})

    def craft(self, inputs: CraftingInputs) -> torch.Tensor:
        """θ_g − (θ_k − θ_g) = 2θ_g − θ_k for every attacker."""
        g = inputs.global_state.to(torch.float64)
        return to_states(g - (inputs.attacker_states.to(torch.float64) - g), inputs.attacker_states)
