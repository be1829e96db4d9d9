"""``coalition_mimic``: an SPMC-aware backdoor that keeps its cosine to the marginal coalition at a benign level
(ATTACKS.md §A5, adaptive attacks).

Source: the target is SPMC (He et al., ICML 2025; ALGORITHMS.md §3-§4). SPMC weights a client by the cosine
between its raw parameter vector and the coalition of the others, and sends each client k its teacher
T_k = Σ_{j≠k} α_j θ_j / Σ_{j≠k} α_j (§4.1), the α-weighted marginal coalition, i.e. the very direction it is scored
against. The attack is the "constrain and scale" idea of Bagdasaryan et al. (AISTATS 2020, §4) and the
AGR-tailored search of Shejwalkar & Houmansadr (NDSS 2021), turned towards SPMC's score: each attacker k of an
attack round

1. trains the backdoor with plain SGD to θ_bd,k (it skips SPMC's client procedure, :attr:`client_procedure` =
   ``plain``, as ``spmc_skip`` does: the projection would purify its backdoor);
2. trains a clean model θ_c,k on its clean data as a benign client would (the configured client procedure, its
   teacher included; ``needs_clean``; under ``attacker_knowledge = partial`` it is the same clean model);
3. sends θ̃_k = T_k + s_k·(θ_bd,k − T_k) with the largest s_k ∈ (0, Γ] such that

       cos(θ̃_k, T_k) ≥ cos(θ_c,k, T_k)            (what a benign client would score against its teacher),

   Γ = ``scale_factor`` (the key of ``scaling``, same declaration: [REC] None = K/m).

Choices where the line in ATTACKS.md is loose:

* **The cosine** is over the vector SPMC scores by default (``spmc_score_space = params``): the trainable
  parameters of the flat state (:meth:`Attack.param_mask`), BatchNorm statistics and integer counters left out,
  raw parameters, not updates; computed in float64 as ⟨a, b⟩/(‖a‖·‖b‖) (0 when a norm is 0; SPMC's ε = 1e-5 in the
  denominator is negligible at parameter norms and left out). θ̃ itself is formed over the whole state (buffers
  interpolated the same way; the server rounds integer counters, as for every crafting attack).
* **The search.** For T_k ≠ 0, cos(T_k + s·v, T_k) is non-increasing in s ≥ 0 (the angle that a point moving
  along a line not through the origin makes with T_k grows monotonically), and s = 0 (θ̃ = T_k) scores 1, so the
  feasible s form an interval [0, s*]. If s = Γ is feasible it is taken; otherwise :data:`BISECT_STEPS` = 30
  bisection steps on [0, Γ] keep the last feasible point (resolution Γ·2⁻³⁰). Every candidate is checked as it
  would be sent, after the cast back to the states' dtype, so the constraint holds exactly for every state sent.
  If no tested s > 0 is feasible (the clean model scores cos = 1 up to rounding), the attacker sends T_k itself
  (s = 0) and a warning is logged.
* **Which teacher.** T_k is the teacher the server sent attacker k this round (:attr:`CraftingInputs.teachers`,
  computed after the previous round; θ⁰ in round 0). With the SPMC client every client gets one whatever the
  defense (with a defense that gives no weights it is the uniform leave-one-out mean of the accepted clients).
  **Fallback:** when the server sends no teachers (``client = plain``; the defense is then not scored against a
  coalition model) T_k = θ_g, and the constraint becomes "no larger angle to the global model than a clean model";
  an attacker without a teacher yet (Flower's first round, a new node) gets θ_g too, as the SPMC client does.
* **Knowledge.** It reads only its own teacher, its own backdoored and clean models and θ_g, so ``full`` and
  ``partial`` give the same states (tested: it never reads ``benign_states`` when its clean models are there).
  Should a clean model be missing (a Flower reply without one), the target is the median cosine to T_k of the
  benign rows it is shown (the round's benign states under ``full``, the other attackers' clean models under
  ``partial``); with none at all, it sends θ_bd unscaled (s = min(1, Γ)).
* No state across rounds; no random numbers. :attr:`CoalitionMimic.last_scales` and ``last_targets`` keep the
  last round's s_k and cos(θ_c,k, T_k) for inspection.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch

from spmc.attacks.base import Attack, CraftingInputs, Hook
from spmc.attacks.crafting import to_states
from spmc.attacks.scaling import ScalingOptions, resolve_scale
from spmc.training import ClientMethod

log = logging.getLogger(__name__)

#: Bisection steps on [0, Γ] (resolution Γ·2⁻³⁰).
BISECT_STEPS = 30


def cosine_to(rows: torch.Tensor, refs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """cos(rows_i, refs_i) per row of [m, d] (``refs`` [m, d] or [d]) over the coordinates of ``mask`` (all when
    None), in float64: ⟨a, b⟩/(‖a‖·‖b‖), 0 when a norm is 0, clamped to [−1, 1]."""
    a = rows.to(torch.float64)
    b = refs.to(torch.float64).expand_as(a)
    if mask is not None:
        a, b = a[:, mask], b[:, mask]
    dot = (a * b).sum(dim=1)
    denom = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, dot / safe, torch.zeros_like(dot)).clamp(-1.0, 1.0)


def mimic(
    teachers: torch.Tensor,
    backdoor: torch.Tensor,
    target: torch.Tensor,
    gamma: float,
    mask: torch.Tensor | None = None,
    steps: int = BISECT_STEPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ̃ [m, d], s [m]): per row, θ̃ = T + s·(θ_bd − T) with the largest s ∈ (0, Γ] found such that
    cos(θ̃, T) ≥ ``target`` (checked on θ̃ cast to ``backdoor``'s dtype); s = Γ when Γ is feasible, else the
    bisection's last feasible point, 0 (θ̃ = T) when none was found."""
    t64 = teachers.to(torch.float64)
    v = backdoor.to(torch.float64) - t64
    target = target.to(torch.float64)

    def candidate(s: torch.Tensor) -> torch.Tensor:
        return to_states(t64 + s.unsqueeze(1) * v, backdoor)

    def feasible(s: torch.Tensor) -> torch.Tensor:
        return cosine_to(candidate(s), teachers, mask) >= target

    m = teachers.shape[0]
    top = torch.full((m,), float(gamma), dtype=torch.float64)
    whole = feasible(top)
    lo, hi = torch.zeros(m, dtype=torch.float64), top.clone()
    for _ in range(steps if not bool(whole.all()) else 0):
        mid = (lo + hi) / 2
        good = feasible(mid)
        lo, hi = torch.where(good, mid, lo), torch.where(good, hi, mid)
    scales = torch.where(whole, top, lo)
    return candidate(scales), scales


class CoalitionMimic(Attack):
    """θ̃_k = T_k + s·(θ_bd,k − T_k), the largest s ≤ Γ with cos(θ̃_k, T_k) ≥ cos(θ_c,k, T_k)."""

    name: ClassVar[str] = "coalition_mimic"
    description: ClassVar[str] = (
        "SPMC-aware: T_k + s·(θ_bd − T_k), largest s ≤ scale_factor keeping cos to the teacher T_k at a clean "
        "model's (§A5)"
    )
    hooks: ClassVar[frozenset[Hook]] = frozenset({"training", "crafting"})
    carries_backdoor: ClassVar[bool] = True
    needs_clean: ClassVar[bool] = True
    client_procedure: ClassVar[ClientMethod | None] = "plain"
    options_type: ClassVar[type[ScalingOptions]] = ScalingOptions
    options: ScalingOptions

    #: s_k and the targets cos(θ_c,k, T_k) of the last crafting round (None before any).
    last_scales: torch.Tensor | None = None
    last_targets: torch.Tensor | None = None

    @property
    def gamma(self) -> float:
        """Γ of this run: ``scale_factor``, or K/m."""
        return resolve_scale(self.options.scale_factor, self.threat)

    def craft(self, inputs: CraftingInputs) -> torch.Tensor:
        """Each attacker's backdoored state pulled towards (or pushed from) its teacher to a benign cosine."""
        backdoor = inputs.attacker_states
        mask = self.param_mask(backdoor.device)
        teachers = inputs.teachers if inputs.teachers is not None else inputs.global_state.expand_as(backdoor)
        teachers = teachers.to(backdoor)
        target = self._targets(inputs, teachers, mask)
        if target is None:
            log.warning("round %d: coalition_mimic has no clean reference; sending the backdoored states", inputs.round)
            scale = min(1.0, self.gamma)
            self.last_scales = torch.full((backdoor.shape[0],), scale, dtype=torch.float64)
            self.last_targets = None
            return to_states(
                teachers.to(torch.float64) + scale * (backdoor.to(torch.float64) - teachers.to(torch.float64)),
                backdoor,
            )
        crafted, scales = mimic(teachers, backdoor, target, self.gamma, mask)
        if bool((scales == 0).any()):
            log.warning(
                "round %d: coalition_mimic found no s > 0 for attackers %s; they send their teacher",
                inputs.round,
                [k for k, s in zip(inputs.attacker_ids, scales.tolist()) if s == 0],
            )
        log.debug("round %d: coalition_mimic s = %s (targets %s)", inputs.round, scales.tolist(), target.tolist())
        self.last_scales, self.last_targets = scales, target
        return crafted

    @staticmethod
    def _targets(inputs: CraftingInputs, teachers: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """cos(θ_c,k, T_k) per attacker; without clean models the median cosine of the shown benign rows to T_k."""
        clean = inputs.clean_states
        if clean is not None and clean.shape == teachers.shape:
            return cosine_to(clean, teachers, mask)
        benign = inputs.benign_states
        if benign.shape[0] == 0:
            return None
        rows = [cosine_to(benign, teachers[i], mask) for i in range(teachers.shape[0])]
        return torch.stack([torch.quantile(r, 0.5) for r in rows])
