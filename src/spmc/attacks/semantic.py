"""``semantic``: the semantic backdoor of spec §2.3 (D35; after Bagdasaryan et al. 2020).

A training sample i of an attacker is poisoned when u_i < ρ (u ~ U[0, 1) per index of the training set, one seeded
generator) and its class is the source class s (3): it is relabelled to τ_bd and gets i.i.d. N(0, σ²) noise in
normalised space, σ = ``semantic_noise_std``. The ASR test set is every test image of class s, with noise, labelled
τ_bd.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from spmc.attacks.badnets import relabel
from spmc.attacks.base import Attack, Hook


class Semantic(Attack):
    """Noisy source-class images relabelled to the target (data hook only)."""

    name: ClassVar[str] = "semantic"
    description: ClassVar[str] = "semantic backdoor: noisy class-3 images relabelled to the target (spec §2.3)"
    hooks: ClassVar[frozenset[Hook]] = frozenset({"data"})
    targeted: ClassVar[bool] = True

    def poison_mask(self, labels: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
        """u_i < ρ and y_i = s."""
        mask = torch.rand(labels.shape[0], generator=generator) < rate
        mask &= labels.cpu() == self.settings.source_label
        return mask.to(labels.device)

    def poison(
        self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_i ← x_i + σ·ε_i, ε_i ~ N(0, I), and y_i ← τ_bd on the masked rows."""
        y = relabel(y, mask, self.settings.target)
        noise = torch.randn(x.shape, generator=generator).to(x.device) * self.settings.noise_std
        return torch.where(mask[:, None, None, None], x + noise, x), y

    def test_set(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every test image of the source class, with noise, labelled τ_bd (spec §2.4)."""
        keep = y == self.settings.source_label
        x, y = x[keep].clone(), y[keep]
        not_target = y != self.settings.target
        xb, yb = self.poison(x, y, torch.ones_like(y, dtype=torch.bool), generator)
        return xb, yb, not_target
