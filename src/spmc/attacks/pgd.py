"""``pgd``: norm-bounded (projected gradient descent) training of the attackers (ATTACKS.md §A4).

Sources: Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?", arXiv 1911.07963 (2019), the
norm-bounded attacker against norm clipping; Wang et al., "Attack of the Tails: Yes, You Really Can Backdoor
Federated Learning", NeurIPS 2020 (arXiv 2007.05084), §4 "PGD": after every local step the attacker projects its
model back onto the ball around the global model

    θ ← θ_g + (θ − θ_g) · min(1, ε / ‖θ − θ_g‖₂),        ε = ``pgd_eps``.

[REC] ``pgd_eps = None`` (``auto``): ε is the median update norm ‖θ_i − θ_g‖ of the benign clients of the previous
round (``attacker_knowledge = full``) or of the attackers' clean estimates ``CraftingInputs.clean_states``
(``partial``), i.e. an update as long as a typical benign one, the largest one a median-based norm clip lets pass.

Choices where the sources are loose:

* The attackers learn the statistic in the crafting hook (the only place where the benign states are seen), so the
  ε used in round t's local training is the one of the last round in which they crafted (the previous round in
  the default schedule; the last attack round under ``attack_every > 1`` or partial participation).
* Before any round was seen (round 0 under ``auto``) there is nothing to project onto during local training; the
  crafting hook then projects the final states: each attacker onto its own clean update norm when clean models are
  given (``CraftingInputs.clean_states``, partial knowledge — the §A4 rule), else onto the median benign update
  norm of the current round (full knowledge, where the attackers train no clean model: that median estimates the
  same clean-update norm from K − m samples instead of one). PGD does not set ``needs_clean``: it would train m
  clean models in every attack round for a statistic needed in round 0 only. Under ``partial`` the benign states
  the crafting step sees are the attackers' pooled clean models, so the learned ε is their median norm.
* The crafting hook always projects the final states onto the round's ball. In the simulator this is a no-op (the
  last local step was projected); in Flower, where local training runs in the ClientApp and crafting in the
  strategy, it is what bounds the update (the ClientApp never sees the benign states, so under ``auto`` it trains
  unprojected).
* Norms and the projection cover the float entries of a state (parameters and BatchNorm statistics, as the update
  guard's and the defenses' norms do); integer counters (``num_batches_tracked``) are left as trained, since their
  step count would otherwise dominate the norm.
* The median of an even count is the mean of the two middle values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from spmc.attacks.base import Attack, AttackSettings, CraftingInputs, Hook
from spmc.options import option
from spmc.threat import ThreatModel

PGD_EPS_HELP = "radius ε > 0 of the L2 ball around θ_g the attackers are projected onto; None = auto (ATTACKS.md §A4)"


def check_pgd_eps(value: float | None) -> None:
    """Raise unless ``value`` is None or a finite number > 0 (the rule of every attack that declares ``pgd_eps``)."""
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
    ):
        raise ValueError(f"pgd_eps: got {value!r}; must be a finite number > 0 or None (auto)")


@dataclass(frozen=True)
class PGDOptions:
    """The radius ε (None: the median benign update norm of the previous round)."""

    eps: float | None = option(None, key="pgd_eps", help=PGD_EPS_HELP)

    def __post_init__(self) -> None:
        check_pgd_eps(self.eps)


def update_norms(states: torch.Tensor, global_state: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """‖θ_i − θ_g‖₂ of every row of ``states`` [n, d] over the coordinates of ``mask`` (all when None), float64 [n]."""
    diff = states.to(torch.float64) - global_state.to(torch.float64)
    if mask is not None:
        diff = diff * mask
    norms: torch.Tensor = torch.linalg.vector_norm(diff, dim=1)
    return norms


def median(values: torch.Tensor) -> float:
    """The median of a non-empty 1-d tensor (the mean of the two middle values for an even count)."""
    return float(torch.quantile(values.to(torch.float64), 0.5))


def project_ball(
    rows: torch.Tensor, center: torch.Tensor, eps: float | torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """θ_g + (θ − θ_g)·min(1, ε/‖θ − θ_g‖₂) for every row of ``rows`` [m, d] around ``center`` [d].

    ``eps`` is one radius or one per row ([m]); only the coordinates of ``mask`` are measured and moved (all when
    None). A row inside its ball (or at the centre) is unchanged; when every row is, ``rows`` itself is returned
    (no copy: this runs after every local step), else a new tensor."""
    diff = rows - center
    if mask is not None:
        diff = diff * mask
    norms = torch.linalg.vector_norm(diff, dim=1, dtype=torch.float64)
    radius = torch.as_tensor(eps, dtype=torch.float64, device=rows.device).expand_as(norms)
    factor = torch.where(norms > radius, radius / norms.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
    if bool((factor == 1.0).all()):
        return rows
    shrink = (factor - 1.0).to(rows.dtype).unsqueeze(1)
    return rows + shrink * diff


class PGD(Attack):
    """Projection onto {‖θ − θ_g‖₂ ≤ ε} after every local step (training) and of the final states (crafting)."""

    name: ClassVar[str] = "pgd"
    description: ClassVar[str] = (
        "norm-bounded attackers: project onto ‖θ − θ_g‖ ≤ pgd_eps after every local step (Sun 2019; Wang 2020)"
    )
    hooks: ClassVar[frozenset[Hook]] = frozenset({"training", "crafting"})
    carries_backdoor: ClassVar[bool] = True
    options_type: ClassVar[type[Any] | None] = PGDOptions

    def __init__(
        self, settings: AttackSettings | None = None, options: Any = None, threat: ThreatModel | None = None
    ) -> None:
        super().__init__(settings, options, threat)
        #: ε learned from the benign (or clean) states of the last crafting round; None before any (``auto``).
        self.learned_eps: float | None = None

    @property
    def configured_eps(self) -> float | None:
        """``pgd_eps`` of the options (None: auto)."""
        eps: float | None = self.options.eps
        return eps

    @property
    def eps(self) -> float | None:
        """The radius of local training: ``pgd_eps``, else the learned one (None: no projection yet)."""
        configured = self.configured_eps
        return configured if configured is not None else self.learned_eps

    def project(self, rows: torch.Tensor, global_state: torch.Tensor) -> torch.Tensor:
        """The rows projected onto the ball of radius :attr:`eps` around θ_g (unchanged while it is unknown)."""
        eps = self.eps
        if eps is None:
            return rows
        return project_ball(rows, global_state, eps, self.float_mask(rows.device))

    def craft(self, inputs: CraftingInputs) -> torch.Tensor:
        """The attackers' states projected onto the round's ball; under ``auto``, ε of the next round learned."""
        mask = self.float_mask(inputs.global_state.device)
        g = inputs.global_state
        estimate = self._estimate(inputs, mask)
        eps: float | torch.Tensor | None = self.eps
        if eps is None:  # round 0 under auto: the attackers' own clean norms, else the round's benign median
            clean = _clean_states(inputs)
            if clean is not None and clean.shape == inputs.attacker_states.shape:
                eps = update_norms(clean, g, mask)
            else:
                eps = estimate
        if self.configured_eps is None and estimate is not None:
            self.learned_eps = estimate
        if eps is None:
            return inputs.attacker_states
        return project_ball(inputs.attacker_states, g, eps, mask)

    @staticmethod
    def _estimate(inputs: CraftingInputs, mask: torch.Tensor | None) -> float | None:
        """The median benign update norm of the round (full knowledge), else that of the clean estimates."""
        if inputs.benign_states.shape[0] > 0:
            return median(update_norms(inputs.benign_states, inputs.global_state, mask))
        clean = _clean_states(inputs)
        if clean is not None and clean.shape[0] > 0:
            return median(update_norms(clean, inputs.global_state, mask))
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The learned ε (nothing before it is known)."""
        if self.learned_eps is None:
            return {}
        return {"eps": torch.tensor(self.learned_eps, dtype=torch.float64)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the learned ε."""
        self.learned_eps = load_eps(self.name, state)


def _clean_states(inputs: CraftingInputs) -> torch.Tensor | None:
    """``inputs.clean_states`` (the attackers' clean models, row i for attacker i) when they were trained."""
    clean = inputs.clean_states
    return clean if clean is not None and clean.dim() == 2 else None


def load_eps(name: str, state: Mapping[str, torch.Tensor], extra: frozenset[str] = frozenset()) -> float | None:
    """The ``eps`` entry of an attack's saved state (a finite positive scalar tensor), or None without one."""
    unknown = set(state) - {"eps"} - extra
    if unknown:
        raise ValueError(f"attack {name!r}: unknown state entries {sorted(unknown)}")
    if "eps" not in state:
        return None
    value = state["eps"]
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
        raise ValueError(f"attack {name!r}: state 'eps' must be a float scalar tensor; got {type(value).__name__}")
    eps = float(value)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"attack {name!r}: state 'eps' = {eps!r}; must be finite and > 0")
    return eps
