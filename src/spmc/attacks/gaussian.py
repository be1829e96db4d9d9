"""``gaussian``: every attacker sends Gaussian noise around the global model (ATTACKS.md §A4; the Gaussian
Byzantine attack of Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017, §5, and FLPoison's ``gaussian``):

    θ̃_k = θ_g + ξ_k,    ξ_k ~ N(0, σ²I) independently per attacker,    σ = ``gaussian_std`` (1.0)

It needs no knowledge of the benign clients and ignores the attacker's training.

**The default σ = 1.0** is FLPoison's ``noise_std`` (its Gaussian attacker submits N(0, 1) as the update). Measured
on the Fashion-MNIST CNN (d = 92,626) after one round of the paper protocol (``demo`` preset, round 0): benign
updates have norms 1.6-2.4 and a per-coordinate std of 0.007, the weights a mean |θ| of 0.037. At σ = 1 the noise
has norm σ√d ≈ 304, about 150× the round's median norm: far below the update guard's 10⁶ × median (and its
|value| ≥ 10¹⁵), so the guard never refuses it (it would take σ ≳ 5·10³ here); averaged by FedAvg with 3 of 10
attackers it adds noise of std 0.3 per coordinate, which wipes out the model, while norm- and distance-based
defenses spot it at once. That is the attack's role in the literature: the baseline Byzantine failure of the mean.
A stealthy variant sets σ on the scale of a benign update's per-coordinate std (e.g. 0.01), which FedAvg absorbs.

**Seeding.** ξ_k is drawn from a CPU ``torch.Generator`` seeded by (run seed, :data:`SEED_GAUSSIAN`, round, client
id): reproducible, the same on both engines and in Flower, independent of which other clients take part, and
stable under resume. It is drawn in the states' dtype and moved to their device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from spmc.attacks.base import Attack, CraftingInputs, Hook
from spmc.attacks.crafting import to_states
from spmc.options import option

#: Purpose of the Gaussian attack's seed stream (the federation uses 1-6, the random attacker pool 7, the
#: partial-knowledge shadows 8).
SEED_GAUSSIAN = 9


@dataclass(frozen=True)
class GaussianOptions:
    """σ of the noise."""

    std: float = option(
        1.0,
        key="gaussian_std",
        help="std σ > 0 of the Gaussian attack's noise θ_g + N(0, σ²I) (ATTACKS.md §A4; FLPoison's 1.0)",
    )

    def __post_init__(self) -> None:
        if isinstance(self.std, bool) or not (math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"gaussian_std: got {self.std!r}; must be a finite number > 0")


def noise_generator(seed: int, t: int, client_id: int) -> torch.Generator:
    """The CPU generator of attacker ``client_id``'s noise in round ``t`` of the run with seed ``seed``."""
    sequence = np.random.SeedSequence([int(seed), SEED_GAUSSIAN, int(t), int(client_id)])
    return torch.Generator().manual_seed(int(sequence.generate_state(1, dtype=np.uint64)[0] >> 1))


class Gaussian(Attack):
    """Gaussian noise: θ_g + N(0, σ²I) for every attacker, seeded by (seed, round, client id)."""

    name: ClassVar[str] = "gaussian"
    description: ClassVar[str] = "Gaussian noise: θ_g + N(0, σ²I), σ = gaussian_std (Blanchard et al. 2017)"
    hooks: ClassVar[frozenset[Hook]] = frozenset({"crafting"})
    options_type: ClassVar[type[GaussianOptions]] = GaussianOptions
    options: GaussianOptions

    def craft(self, inputs: CraftingInputs) -> torch.Tensor:
        """θ_g + σ·ξ_k, ξ_k ~ N(0, I) from the generator of (seed, round, attacker id)."""
        states = inputs.attacker_states
        d = inputs.global_state.shape[0]
        noise = torch.stack(
            [
                torch.randn(d, generator=noise_generator(self.threat.seed, inputs.round, k), dtype=states.dtype)
                for k in inputs.attacker_ids
            ]
        ).to(states.device)
        g = inputs.global_state.to(torch.float64)
        return to_states(g + self.options.std * noise.to(torch.float64), states)
