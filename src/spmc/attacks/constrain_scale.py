"""``constrain_scale``: constrain-and-scale (Bagdasaryan, Veit, Hua, Estrin, Shmatikov, "How To Backdoor Federated
Learning", AISTATS 2020, arXiv 1807.00459, §4 "Evading anomaly detection"; ATTACKS.md §A4).

The attackers train on the loss L = α·L_class + (1 − α)·L_ano with the anomaly term L_ano = ‖θ − θ_g‖₂², so
every local gradient (before momentum and weight decay) becomes

    g ← α·g + (1 − α)·2·(θ − θ_g),        α = ``cs_alpha`` (0.7),

and after local training each attacker scales its update as ``scaling`` does (model replacement):

    θ̃ = θ_g + Γ·(θ − θ_g),        Γ = ``scale_factor``, [REC] None = K/m.

Choices where the source is loose:

* The paper leaves L_ano open (any distance the defense checks); §A4 fixes the squared L2 distance to θ_g, whose
  gradient is 2(θ − θ_g). Its α·L_class weighs the mean cross-entropy of the batch (the engines' loss).
* The anomaly term acts on the trainable parameters only (a BatchNorm statistic has no gradient step); the scaling
  moves the float entries (parameters and BatchNorm statistics) and leaves the integer counters
  (``num_batches_tracked``) as trained.
* Γ counts the run's K and m (K/m, K when m = 0), as ``scaling`` does; ``scale_factor`` is the same key, with the
  same type, default and help as there. The scaling is float64 arithmetic cast back to the states' dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from spmc.attacks.base import Attack, CraftingInputs, Hook
from spmc.options import option

SCALE_FACTOR_HELP = "model-replacement factor Γ > 0 of the attackers' updates; None = K/m (ATTACKS.md §A4)"


@dataclass(frozen=True)
class ConstrainScaleOptions:
    """α of the loss and the scaling factor Γ (None: K/m)."""

    alpha: float = option(0.7, key="cs_alpha", help="weight α in (0, 1] of the task loss against ‖θ − θ_g‖² (§A4)")
    scale_factor: float | None = option(None, key="scale_factor", help=SCALE_FACTOR_HELP)

    def __post_init__(self) -> None:
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or not 0.0 < a <= 1.0:
            raise ValueError(f"cs_alpha: got {a!r}; must be a number in (0, 1]")
        g = self.scale_factor
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g <= 0):
            raise ValueError(f"scale_factor: got {g!r}; must be a finite number > 0 or None (K/m)")


class ConstrainScale(Attack):
    """The anomaly-penalised local loss (training), then the attackers' updates scaled by Γ (crafting)."""

    name: ClassVar[str] = "constrain_scale"
    description: ClassVar[str] = (
        "constrain-and-scale: loss α·CE + (1 − α)·‖θ − θ_g‖², then θ_g + Γ·(θ − θ_g) (Bagdasaryan 2020 §4)"
    )
    hooks: ClassVar[frozenset[Hook]] = frozenset({"training", "crafting"})
    carries_backdoor: ClassVar[bool] = True
    options_type: ClassVar[type[Any] | None] = ConstrainScaleOptions

    @property
    def alpha(self) -> float:
        """α of this run."""
        return float(self.options.alpha)

    @property
    def gamma(self) -> float:
        """Γ of this run: ``scale_factor``, or K/m (K when m = 0)."""
        if self.options.scale_factor is not None:
            return float(self.options.scale_factor)
        return self.threat.num_clients / max(self.threat.expected_attackers, 1)

    def gradient(self, grad: torch.Tensor, rows: torch.Tensor, global_state: torch.Tensor) -> torch.Tensor:
        """α·g + (1 − α)·2·(θ − θ_g) on the parameters (a new tensor)."""
        a = self.alpha
        prox = rows - global_state
        mask = self.param_mask(rows.device)
        if mask is not None:
            prox = prox * mask
        return a * grad + (2.0 * (1.0 - a)) * prox

    def craft(self, inputs: CraftingInputs) -> torch.Tensor:
        """θ_g + Γ·(θ − θ_g) for every attacker, on the float entries."""
        g = inputs.global_state.to(torch.float64)
        states = inputs.attacker_states
        diff = states.to(torch.float64) - g
        mask = self.float_mask(states.device)
        if mask is not None:
            diff = diff * mask
        return (states.to(torch.float64) + (self.gamma - 1.0) * diff).to(states.dtype)
