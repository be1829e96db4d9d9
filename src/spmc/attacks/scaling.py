"""``scaling``: model replacement (Bagdasaryan, Veit, Hua, Estrin, Shmatikov, "How To Backdoor Federated Learning",
AISTATS 2020, arXiv 1807.00459, §3.2; ATTACKS.md §A4).

Every attacker k of an attack round sends

    θ̃_k = θ_g + Γ·(θ_k − θ_g),        Γ = ``scale_factor``, [REC] None = K/m

with K = ``num_clients`` and m = ⌊γK⌋ the run's attackers (the threat model). The paper scales by n/η (n clients per
round, η the server learning rate) so that one attacker's update replaces the FedAvg average; with m colluding
attackers each scales by K/m, so that their scaled updates sum to the replacement. With no attacker (m = 0, crafting
then never runs) Γ = K. Choices: Γ counts the run's K and m, not the round's participants (ATTACKS.md §A4); the
arithmetic is in float64, cast back with the clamp of :func:`spmc.attacks.crafting.to_states`.

Combined with a data attack (``attack = badnets``, ``update_attack = scaling``) it scales the backdoored update;
alone (``attack = none``) it scales an honest update (untargeted: the attackers' step is Γ times too long).

The update guard (:mod:`spmc.guard`) refuses ‖u‖ > 10⁶ × the round's median norm: at the default Γ = K/m (3.3 at
K = 10, γ = 0.3) a scaled update passes it; it would take Γ ≳ 10⁶.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from spmc.attacks.base import Attack, CraftingInputs, Hook
from spmc.attacks.crafting import to_states
from spmc.options import option
from spmc.threat import ThreatModel

SCALE_FACTOR_HELP = "model-replacement factor Γ > 0 of the attackers' updates; None = K/m (ATTACKS.md §A4)"


def check_scale_factor(value: float | None) -> None:
    """Raise unless ``value`` is None or a finite number > 0 (the rule of every attack that declares it)."""
    if value is not None and (isinstance(value, bool) or not math.isfinite(value) or value <= 0):
        raise ValueError(f"scale_factor: got {value!r}; must be a finite number > 0 or None (K/m)")


def resolve_scale(value: float | None, threat: ThreatModel) -> float:
    """Γ = ``value``, or K/m of ``threat`` when None (K when m = 0)."""
    if value is not None:
        return float(value)
    return threat.num_clients / max(threat.expected_attackers, 1)


@dataclass(frozen=True)
class ScalingOptions:
    """The scaling factor Γ (None: K/m)."""

    scale_factor: float | None = option(None, key="scale_factor", help=SCALE_FACTOR_HELP)

    def __post_init__(self) -> None:
        check_scale_factor(self.scale_factor)


def scale_updates(states: torch.Tensor, global_state: torch.Tensor, gamma: float) -> torch.Tensor:
    """θ_g + Γ·(θ − θ_g) for every row of ``states`` [m, d], float64 arithmetic, in the states' dtype."""
    g = global_state.to(torch.float64)
    return to_states(g + gamma * (states.to(torch.float64) - g), states)


class Scaling(Attack):
    """Model replacement: the attackers' updates multiplied by Γ."""

    name: ClassVar[str] = "scaling"
    description: ClassVar[str] = "model replacement: θ_g + Γ·(θ_k − θ_g), Γ = scale_factor or K/m (Bagdasaryan 2020)"
    hooks: ClassVar[frozenset[Hook]] = frozenset({"crafting"})
    carries_backdoor: ClassVar[bool] = True
    options_type: ClassVar[type[ScalingOptions]] = ScalingOptions
    options: ScalingOptions

    @property
    def gamma(self) -> float:
        """Γ of this run."""
        return resolve_scale(self.options.scale_factor, self.threat)

    def craft(self, inputs: CraftingInputs) -> torch.Tensor:
        """θ̃_k = θ_g + Γ·(θ_k − θ_g) for every attacker."""
        return scale_updates(inputs.attacker_states, inputs.global_state, self.gamma)
