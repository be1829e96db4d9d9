"""``label_flip``: the untargeted label-flipping attack (Fang, Cao, Jia & Gong, "Local Model Poisoning Attacks to
Byzantine-Robust Federated Learning", USENIX Security 2020, §5 "label flipping"; FLPoison's ``LabelFlipping``;
ATTACKS.md §A3).

Every training sample of an attacker gets y → C − 1 − y (C = the dataset's number of classes,
:attr:`AttackSettings.num_classes`); images are unchanged. ``poison_rate`` does not apply: the mask is every sample.
The attack is untargeted (``targeted = False``): runs report A and ΔA against the same run without attack; its
"test set" is the clean test set, returned unchanged (the ASR computed on it is the clean accuracy and is not
reported as R).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from spmc.attacks.base import Attack, Hook


class LabelFlip(Attack):
    """y → C − 1 − y on every sample of an attacker (data hook only)."""

    name: ClassVar[str] = "label_flip"
    description: ClassVar[str] = "untargeted label flipping (Fang 2020): every attacker sample gets y → C − 1 − y"
    hooks: ClassVar[frozenset[Hook]] = frozenset({"data"})
    targeted: ClassVar[bool] = False

    def poison_mask(self, labels: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
        """Every sample (``rate`` is ignored; the generator is not drawn from)."""
        return torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)

    def poison(
        self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """y_i ← C − 1 − y_i on the masked rows; ``x`` unchanged."""
        return x, torch.where(mask, self.settings.num_classes - 1 - y, y)

    def test_set(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The clean test set (an untargeted attack has no trigger)."""
        return x, y, y != self.settings.target
