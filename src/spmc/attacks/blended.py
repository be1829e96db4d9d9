"""``blended``: the blended-injection backdoor (Chen et al. 2017, "Targeted Backdoor Attacks on Deep Learning
Systems Using Data Poisoning", arXiv 1712.05526, §4.2; ATTACKS.md §A3).

In [0, 1] pixel space, before normalisation, a poisoned image is x' = (1 − a)·x + a·P, with P a fixed image of
uniform noise U[0, 1) of the input's shape [C, H, W] drawn from ``blend_seed`` (one ``torch.Generator``), and
a = ``blend_alpha`` in training and at test time (the paper blends with α_train = 0.2 and tests with the same key
pattern). The data hook sees normalised batches x_n = (x − μ_c)/σ_c, so the formula is applied as
x'_n = (1 − a)·x_n + a·(P − μ_c)/σ_c, which equals normalising x' (μ, σ: the dataset's statistics,
:class:`AttackSettings.mean` / ``std``). Which samples are poisoned is the ``badnets`` rule (u_i < ρ, one seeded
generator), relabelled to τ_bd; the ASR test set is every test image blended and labelled τ_bd.

Choices where the source is loose: P is drawn per channel (a colour noise image, also on grey datasets whose three
channels are copies), and once per input shape (it is cached), so every attacker and the test set share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from spmc.attacks.badnets import relabel
from spmc.attacks.base import Attack, AttackSettings, Hook
from spmc.options import option
from spmc.threat import ThreatModel


@dataclass(frozen=True)
class BlendedOptions:
    """The blend ratio a and the seed of the noise image P."""

    alpha: float = option(0.2, key="blend_alpha", help="blend ratio a of x' = (1 − a)·x + a·P, in (0, 1] (Chen 2017)")
    seed: int = option(0, key="blend_seed", help="seed of the uniform-noise pattern P, an integer >= 0 (Chen 2017)")

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"blend_alpha: got {self.alpha!r}; must be in (0, 1]")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"blend_seed: got {self.seed!r}; must be an integer >= 0")


def noise_pattern(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """P ~ U[0, 1) of ``shape`` [C, H, W], from a generator seeded with ``seed``."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def blend(
    x: torch.Tensor,
    pattern: torch.Tensor,
    alpha: float,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> torch.Tensor:
    """The normalised batch ``x`` [B, C, H, W] blended with the pixel-space ``pattern`` [C, H, W]:
    (1 − a)·x_n + a·(P − μ_c)/σ_c (a new tensor)."""
    c = x.shape[1]
    mu = _per_channel(mean, c, x)
    sigma = _per_channel(std, c, x)
    p = (pattern.to(x.device, x.dtype) - mu) / sigma
    return (1.0 - alpha) * x + alpha * p


def _per_channel(values: tuple[float, ...], c: int, like: torch.Tensor) -> torch.Tensor:
    if len(values) not in (1, c):
        raise ValueError(f"normalisation: got {len(values)} per-channel values for {c} channels")
    t = torch.tensor(values, dtype=like.dtype, device=like.device)
    return t.expand(c).reshape(c, 1, 1)


class Blended(Attack):
    """x' = (1 − a)·x + a·P in pixel space, relabel to the target (data hook only)."""

    name: ClassVar[str] = "blended"
    description: ClassVar[str] = (
        "blended backdoor (Chen 2017): x' = (1 − a)·x + a·P with a seeded uniform-noise image P, relabel to the target"
    )
    hooks: ClassVar[frozenset[Hook]] = frozenset({"data"})
    targeted: ClassVar[bool] = True
    options_type: ClassVar[type[BlendedOptions]] = BlendedOptions
    options: BlendedOptions

    def __init__(
        self,
        settings: AttackSettings | None = None,
        options: BlendedOptions | None = None,
        threat: ThreatModel | None = None,
    ) -> None:
        super().__init__(settings, options, threat)
        self._patterns: dict[tuple[int, ...], torch.Tensor] = {}

    def pattern(self, shape: tuple[int, ...]) -> torch.Tensor:
        """P for inputs of ``shape`` [C, H, W] (drawn once from ``blend_seed``)."""
        if shape not in self._patterns:
            self._patterns[shape] = noise_pattern(shape, self.options.seed)
        return self._patterns[shape]

    def poison_mask(self, labels: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
        """u_i < ρ with u_i ~ U[0, 1) for every index i (the ``badnets`` rule)."""
        return (torch.rand(labels.shape[0], generator=generator) < rate).to(labels.device)

    def poison(
        self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The masked rows blended with P and relabelled to τ_bd (a new tensor)."""
        blended = blend(x, self.pattern(tuple(x.shape[1:])), self.options.alpha, self.settings.mean, self.settings.std)
        return torch.where(mask[:, None, None, None], blended, x), relabel(y, mask, self.settings.target)

    def test_set(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every test image blended and labelled τ_bd; ``x`` is not modified."""
        xb, yb = self.poison(x, y, torch.ones_like(y, dtype=torch.bool), generator)
        return xb, yb, y != self.settings.target
