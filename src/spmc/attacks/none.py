"""``none``: no attack; every client is benign. The ASR test set is still the ``badnets`` one (spec §2.4), so that
a clean run reports how often the pattern alone flips the prediction."""

from __future__ import annotations

from typing import ClassVar

import torch

from spmc.attacks.badnets import BadNets
from spmc.attacks.base import Attack, Hook


class NoAttack(Attack):
    """No hook; the test set of :class:`BadNets`."""

    name: ClassVar[str] = "none"
    description: ClassVar[str] = "no attack: every client is benign"
    hooks: ClassVar[frozenset[Hook]] = frozenset()

    def test_set(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``badnets`` test set."""
        return BadNets(self.settings).test_set(x, y, generator)
