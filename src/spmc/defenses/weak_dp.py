"""Weak differential privacy (Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?", arXiv
1911.07963, 2019, §4; ATTACKS.md §A6): norm clipping, then Gaussian noise on the aggregate.

    θ_g ← norm_clip(θ_g, {θ_k})                      (:mod:`spmc.defenses.norm_clip`: clip to M, uniform mean)
    vec_P(θ_g) ← vec_P(θ_g) + N(0, σ² I)            σ = ``dp_sigma``

The noise goes on the trainable parameters only: float buffers (BN's running variance) must stay positive and the
paper's models have none. It is drawn from ``round_generator(seed, round)``, so it depends on the experiment seed and
the round only, never on the clients' order or the global RNG.

Default σ = 0.002 (a choice, not measured here). Sun et al. use σ = 0.025 on EMNIST and report that it costs
main-task accuracy. Here the noise lands on SimpleCNN's d = 92,626 parameters (spec §1.3), whose first layers start
at U(±0.11): σ = 0.025 adds a noise of norm σ√d ≈ 7.6 every round, and its per-coordinate drift σ√t reaches 0.18
after 50 rounds, above the initial weights. σ = 0.002 (noise norm ≈ 0.6 per round, a drift of 0.014 after 50
rounds) keeps the accumulated noise well below the initial weights while still perturbing every round; the
trade-off against a benign update's norm was not measured. Set ``dp_sigma = 0.025`` for the paper's value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from spmc.defenses.base import Aggregate, RoundInputs, as_weight_list, finite_global, round_generator
from spmc.defenses.norm_clip import check_clip_norm, clip_diagnostics, clipped_mean_state, uniform_weights
from spmc.options import option
from spmc.threat import ThreatModel


def add_gaussian_noise(
    state: torch.Tensor, mask: torch.Tensor, sigma: float, generator: torch.Generator
) -> torch.Tensor:
    """``state`` with N(0, σ²) added to each entry where ``mask`` is set (drawn in float64 on the CPU from
    ``generator``, so the same on every device); a new tensor in the state's dtype."""
    out = state.clone()
    if sigma == 0.0:
        return out
    count = int(mask.sum())
    noise = torch.randn(count, generator=generator, dtype=torch.float64) * sigma
    out[mask] = (state[mask].to(torch.float64) + noise.to(state.device)).to(state.dtype)
    return out


@dataclass(frozen=True)
class WeakDPOptions:
    """Weak DP's options: the clip bound M (shared with norm_clip), the noise σ, integer counters left out."""

    clip_norm: float | None = option(
        None,
        "clip_norm",
        "norm_clip / weak_dp: clip every update to this L2 norm (> 0); None = auto, the round's median update norm "
        "(Sun et al. 2019; ATTACKS.md §A6)",
    )
    sigma: float = option(
        0.002,
        "dp_sigma",
        "weak_dp: std of the Gaussian noise added to every parameter of the aggregate (>= 0; Sun et al. 2019 use "
        "0.025 on EMNIST; ATTACKS.md §A6)",
    )
    exclude_int_buffers: bool = option(
        True,
        "exclude_int_buffers",
        "leave integer counters (BN's num_batches_tracked) out of vector statistics (spec D31)",
    )

    def __post_init__(self) -> None:
        check_clip_norm(self.clip_norm)
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"dp_sigma: got {self.sigma!r}; must be a finite number >= 0")


class WeakDP:
    """Norm clipping plus Gaussian noise on the aggregated parameters."""

    name: ClassVar[str] = "weak_dp"
    description: ClassVar[str] = "Weak DP: norm clipping, uniform mean, Gaussian noise N(0, σ²) on the parameters"
    needs_server_data: ClassVar[bool] = False
    options_type: ClassVar[type[WeakDPOptions]] = WeakDPOptions

    def __init__(self, options: WeakDPOptions | None = None, threat: ThreatModel | None = None) -> None:
        self.options = options if options is not None else WeakDPOptions()
        self.seed = (threat if threat is not None else ThreatModel()).seed

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        w = uniform_weights(inputs.n)
        new, factors, bound = clipped_mean_state(inputs, w, self.options.clip_norm, self.options.exclude_int_buffers)
        params = inputs.layout.param_mask(new.device)
        noisy = add_gaussian_noise(new, params, self.options.sigma, round_generator(self.seed, inputs.round))
        return Aggregate(
            global_state=finite_global(noisy, self.name),
            weights=w,
            accepted=inputs.client_ids,
            diagnostics={"weights": as_weight_list(w, inputs.client_ids), "dp_sigma": self.options.sigma}
            | clip_diagnostics(factors, bound, inputs.client_ids),
        )
