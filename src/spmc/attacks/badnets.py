"""``badnets`` (alias ``base``): the pixel-pattern backdoor of spec §2.2 (Table 2; Gu et al. 2017, BadNets).

12 entries of channel 0, rows {0, 2} × columns {0, 1, 2, 4, 5, 6}, are set to v_c in normalised space: v_c = 1.0
(``trigger_space = normalized``) or raw intensity 1.0, i.e. (1 − mean_c)/std_c after Normalize (``pixel``).
A training sample i of an attacker is poisoned when u_i < ρ, u ~ U[0, 1) drawn for every index of the training set
from one seeded generator, and relabelled to τ_bd. The ASR test set is every test image triggered and labelled τ_bd.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from spmc.attacks.base import Attack, Hook

TRIGGER_ROWS: tuple[int, ...] = (0, 2)
TRIGGER_COLS: tuple[int, ...] = (0, 1, 2, 4, 5, 6)


def trigger_values(
    space: str, mean: Sequence[float], std: Sequence[float], channels: Sequence[int] = (0,)
) -> dict[int, float]:
    """The value written into each trigger channel, in normalised space (spec §2.2, D13)."""
    if space == "normalized":
        return {c: 1.0 for c in channels}
    if space == "pixel":
        return {c: (1.0 - mean[c]) / std[c] for c in channels}
    raise ValueError(f"trigger_space: unknown value {space!r}; allowed: normalized, pixel")


def apply_trigger(x: torch.Tensor, values: dict[int, float], rows: torch.Tensor | None = None) -> torch.Tensor:
    """Write the trigger into the normalised batch ``x`` [B, 3, H, W] in place (only rows where ``rows`` is True)."""
    r = torch.tensor(TRIGGER_ROWS, device=x.device)
    c = torch.tensor(TRIGGER_COLS, device=x.device)
    for channel, value in values.items():
        patch = x[:, channel, r[:, None], c[None, :]]
        if rows is None:
            patch.fill_(value)
        else:
            patch[rows] = value
        x[:, channel, r[:, None], c[None, :]] = patch
    return x


def relabel(y: torch.Tensor, mask: torch.Tensor, target: int) -> torch.Tensor:
    """y_i ← τ_bd where ``mask`` is True."""
    return torch.where(mask, torch.full_like(y, target), y)


class BadNets(Attack):
    """The 12-entry pixel pattern, relabel to the target (data hook only)."""

    name: ClassVar[str] = "badnets"
    description: ClassVar[str] = (
        "pixel-pattern backdoor of Table 2: 12 trigger entries in channel 0, relabel to the target (spec §2.2)"
    )
    hooks: ClassVar[frozenset[Hook]] = frozenset({"data"})
    targeted: ClassVar[bool] = True

    def poison_mask(self, labels: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
        """u_i < ρ with u_i ~ U[0, 1) for every index i."""
        return (torch.rand(labels.shape[0], generator=generator) < rate).to(labels.device)

    def poison(
        self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Trigger written into the masked rows of ``x`` (in place), their labels set to τ_bd."""
        y = relabel(y, mask, self.settings.target)
        apply_trigger(x, self.settings.trigger, rows=mask)
        return x, y

    def test_set(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every test image triggered and labelled τ_bd (spec §2.4); ``x`` is not modified."""
        x = x.clone()
        not_target = y != self.settings.target
        xb, yb = self.poison(x, y, torch.ones_like(y, dtype=torch.bool), generator)
        return xb, yb, not_target
