"""CRFL, server side: scale, average, clip the parameter norm, perturb (Xie et al., ICML'21; spec §6.7, D23).

With p_k = n_k / Σ_j n_j, round t (0-based) of T:

    vec_P(θ_k) ← vec_P(θ_g) + s · (vec_P(θ_k) − vec_P(θ_g))           (scale factor s; buffers untouched)
    θ_g ← Σ_k p_k θ_k                                                   (whole state)
    ρ_t = min(slope · t + bias, cap)
    if ‖vec_P(θ_g)‖ > ρ_t:  vec_P(θ_g) ← vec_P(θ_g) · ρ_t / (‖vec_P(θ_g)‖ + 1e−6)
    if t < T − 1:           vec_P(θ_g) ← vec_P(θ_g) + N(0, σ² I)        (noise from ``round_generator(seed, t)``)

Buffers are never clipped or perturbed. As in the repo, there is no test-time smoothing or certification.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from spmc.defenses._options import check_int, check_real
from spmc.defenses.base import Aggregate, RoundInputs, as_weight_list, finite_global, round_generator, weighted_average
from spmc.defenses.fedavg import fedavg_weights
from spmc.options import option
from spmc.threat import ThreatModel


def clip_threshold(round_index: int, slope: float = 5.0, bias: float = 30.0, cap: float = 100.0) -> float:
    """ρ_t = min(slope · t + bias, cap)."""
    return min(slope * round_index + bias, cap)


def clip_norm(vec: torch.Tensor, threshold: float) -> tuple[torch.Tensor, float]:
    """``vec`` scaled by ρ / (‖vec‖ + 1e−6) if its norm exceeds ρ; returns (vector, norm before clipping)."""
    norm = float(vec.to(torch.float64).norm())
    if norm > threshold:
        vec = (vec.to(torch.float64) * (threshold / (norm + 1e-6))).to(vec.dtype)
    return vec, norm


def scaled_mean(
    global_state: torch.Tensor,
    client_states: torch.Tensor,
    weights: torch.Tensor,
    param_mask: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """Σ_k p_k θ_k over the whole state after scaling every parameter update by s (step 1-2 of §6.7)."""
    new = weighted_average(client_states, weights.to(client_states.device))
    if scale != 1.0:
        g = global_state[param_mask].to(torch.float64)
        new[param_mask] = (g + scale * (new[param_mask].to(torch.float64) - g)).to(new.dtype)
    return new


@dataclass(frozen=True)
class CRFLOptions:
    """CRFL's options: the run's T = ``rounds`` (no noise in round T − 1), the clip schedule, σ and the scale."""

    rounds: int = option(
        50, key="rounds", help="T, the run's rounds (no noise in round T − 1); integer >= 1 (ALGORITHMS.md §6.7)"
    )
    clip_cap: float = option(
        100.0,
        key="crfl_clip_cap",
        help="cap of the norm threshold ρ_t = min(slope·t + bias, cap); > 0 (ALGORITHMS.md §6.7, D23)",
    )
    clip_slope: float = option(
        5.0, key="crfl_clip_slope", help="growth of ρ_t per round; >= 0 (ALGORITHMS.md §6.7, D23)"
    )
    clip_bias: float = option(
        30.0, key="crfl_clip_bias", help="ρ_0, the threshold in round 0; > 0 (ALGORITHMS.md §6.7, D23)"
    )
    sigma: float = option(
        1e-4, key="crfl_sigma", help="σ of the Gaussian noise added to the parameters; >= 0 (ALGORITHMS.md §6.7, D23)"
    )
    scale: float = option(
        1.0, key="crfl_scale", help="s in θ_k ← θ_g + s·(θ_k − θ_g) before the mean; > 0 (ALGORITHMS.md §6.7, D23)"
    )

    def __post_init__(self) -> None:
        check_int("rounds", self.rounds, 1)
        check_real("crfl_clip_cap", self.clip_cap, gt=0.0)
        check_real("crfl_clip_slope", self.clip_slope, ge=0.0)
        check_real("crfl_clip_bias", self.clip_bias, gt=0.0)
        check_real("crfl_sigma", self.sigma, ge=0.0)
        check_real("crfl_scale", self.scale, gt=0.0)


class CRFL:
    """Weighted mean, then a norm clip with a growing threshold and Gaussian noise on the parameters."""

    name: ClassVar[str] = "crfl"
    description: ClassVar[str] = "CRFL: weighted mean, parameter-norm clipping and Gaussian noise (spec §6.7)"
    needs_server_data: ClassVar[bool] = False
    options_type: ClassVar[type[CRFLOptions]] = CRFLOptions

    def __init__(self, options: CRFLOptions | None = None, threat: ThreatModel | None = None) -> None:
        self.options = options if options is not None else CRFLOptions()
        self.seed = (threat if threat is not None else ThreatModel()).seed

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        p = fedavg_weights(inputs.num_samples, "samples")
        mask = inputs.layout.param_mask(inputs.client_states.device)
        new = scaled_mean(inputs.global_state, inputs.client_states, p, mask, self.options.scale)
        rho = clip_threshold(inputs.round, self.options.clip_slope, self.options.clip_bias, self.options.clip_cap)
        params, norm = clip_norm(new[mask], rho)
        noisy = inputs.round < self.options.rounds - 1 and self.options.sigma > 0
        if noisy:
            gen = round_generator(self.seed, inputs.round)
            noise = torch.randn(params.shape, generator=gen, dtype=torch.float64) * self.options.sigma
            params = (params.to(torch.float64) + noise.to(params.device)).to(params.dtype)
        new[mask] = params
        return Aggregate(
            global_state=finite_global(new, self.name),
            weights=p,
            accepted=inputs.client_ids,
            diagnostics={
                "weights": as_weight_list(p, inputs.client_ids),
                "clip_threshold": rho,
                "param_norm": norm,
                "clipped": norm > rho,
                "noise": noisy,
            },
        )
