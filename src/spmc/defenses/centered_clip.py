"""Centered clipping (Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization", ICML 2021,
Alg. 2; ATTACKS.md §A6).

On the updates u_k = θ_k − θ_g restricted to the float entries (integer counters left out, spec D31):

    v_0   = the previous round's aggregate update (0 in the first round this object aggregates)
    v_l+1 = v_l + (1/n) Σ_k clip(u_k − v_l, τ),     clip(z, τ) = z · min(1, τ/‖z‖),     l = 0 … L − 1
    θ_g  ← θ_g + v_L                                  (float entries)
    θ_g  ← (1/n) Σ_k θ_k                               (integer counters, the plain mean)

τ = ``cc_tau``, L = ``cc_iters``. Defaults τ = 100, L = 1: the authors' public code (epfml/byzantine-robust-optimizer,
``Clipping(tau=100, n_iter=1)`` in its CIFAR-10 experiments; its hyper-parameter sweep covers τ ∈ {0.1, 10, 1000},
L ∈ {1, 3, 5}) and FLPoison's CenteredClipping use the same; the paper shows one iteration suffices when v_0 is a good
centre (its Theorem III). τ is an absolute L2 radius in the units of an update: the paper clips SGD momenta; a
federated update after local epochs of SimpleCNN is usually far shorter than 100, so τ = 100 then clips only large
(scaled) updates — set ``cc_tau`` to the scale of a benign update (or smaller) for a stricter rule. τ = inf is the
plain mean (v_1 = mean u_k for L = 1).

Each iteration moves v by at most τ/n per client, whatever that client sent. The state v (one float64 vector over
the float entries) is kept across rounds and saved in checkpoints under the key ``SERVER_KEY`` = −1 (it belongs to
no client). The mean is uniform (sample counts are ignored), as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from spmc.defenses.base import Aggregate, RoundInputs, as_weight_list, finite_global, stat_mask, weighted_average
from spmc.defenses.norm_clip import (
    add_scaled,
    clip_factors,
    power_of_two_scale,
    scaled_combination,
    scaled_row_norms,
    uniform_weights,
)
from spmc.options import option

SERVER_KEY = -1
"""The key of v in :meth:`CenteredClip.state_dict` (v is the server's, not a client's)."""


def centered_clip_step(updates: torch.Tensor, center: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One iteration v ← v + (1/n) Σ_k clip(u_k − v, τ) on ``updates`` [n, d] around ``center`` [d].

    Returns (the new v, float64 [d], possibly non-finite where it leaves the float64 range; the clip factors
    min(1, τ/‖u_k − v‖), float64 [n]). Norms and sums are taken on entries divided by one power of two, so no finite
    input overflows them."""
    n = updates.shape[0]
    scale = power_of_two_scale(updates, center)
    norms = scaled_row_norms(updates, scale, center)
    factors = clip_factors(norms, tau / scale)
    step = scaled_combination(updates, factors / n, scale, center)
    return add_scaled(center.to(updates.device), step, scale), factors


def centered_clip(
    updates: torch.Tensor, start: torch.Tensor, tau: float, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """v_L from v_0 = ``start`` after ``iters`` iterations of :func:`centered_clip_step`; returns (v_L float64 [d],
    the last iteration's clip factors float64 [n]). ``ValueError`` when v leaves the float64 range."""
    v = start.to(device=updates.device, dtype=torch.float64)
    factors = torch.ones(updates.shape[0], dtype=torch.float64)
    for _ in range(iters):
        v, factors = centered_clip_step(updates, v, tau)
        if not bool(torch.isfinite(v).all()):
            raise ValueError("centered_clip: the centre v overflows float64; the client updates are too large")
    return v, factors


@dataclass(frozen=True)
class CenteredClipOptions:
    """Centered clipping's options: the radius τ, the iterations L, integer counters left out."""

    tau: float = option(
        100.0,
        "cc_tau",
        "centered_clip: clipping radius τ around the centre, an L2 norm in update units (> 0, inf = the mean; "
        "Karimireddy et al. ICML 2021 code: 100)",
    )
    iters: int = option(
        1,
        "cc_iters",
        "centered_clip: clipping iterations L per round (>= 1; Karimireddy et al. ICML 2021: 1)",
    )
    exclude_int_buffers: bool = option(
        True,
        "exclude_int_buffers",
        "leave integer counters (BN's num_batches_tracked) out of vector statistics (spec D31)",
    )

    def __post_init__(self) -> None:
        if not (isinstance(self.tau, (int, float)) and not math.isnan(self.tau) and self.tau > 0):
            raise ValueError(f"cc_tau: got {self.tau!r}; must be a number > 0 (inf: no clipping, the mean)")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or not 1 <= self.iters <= 1000:
            raise ValueError(f"cc_iters: got {self.iters!r}; must be an integer in 1 … 1000")


class CenteredClip:
    """Iterative clipping around the previous round's aggregate update; v lives on this object across rounds."""

    name: ClassVar[str] = "centered_clip"
    description: ClassVar[str] = "Centered clipping: L steps of clipping around the last aggregate update (ICML'21)"
    needs_server_data: ClassVar[bool] = False
    options_type: ClassVar[type[CenteredClipOptions]] = CenteredClipOptions

    def __init__(self, options: CenteredClipOptions | None = None) -> None:
        self.options = options if options is not None else CenteredClipOptions()
        self.center: torch.Tensor | None = None

    def state_dict(self) -> dict[int, torch.Tensor]:
        """``{SERVER_KEY: v}`` (v on the CPU) once a round was aggregated, else ``{}``."""
        return {} if self.center is None else {SERVER_KEY: self.center.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[int | str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` wrote (the key may be the string ``"-1"``)."""
        center: torch.Tensor | None = None
        for k, v in state.items():
            if str(k) != str(SERVER_KEY):
                raise ValueError(f"centered_clip state: unexpected key {k!r}; expected {SERVER_KEY}")
            if not isinstance(v, torch.Tensor) or v.dim() != 1 or not v.is_floating_point():
                raise ValueError(f"centered_clip state: expected a 1-D float tensor, got {v!r:.80}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError("centered_clip state: the centre v has non-finite entries")
            center = v.detach().clone()
        self.center = center

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        mask = stat_mask(inputs.layout, self.options.exclude_int_buffers, inputs.client_states.device)
        updates = inputs.updates[:, mask]
        if self.center is not None and self.center.shape != updates.shape[1:]:
            raise ValueError(
                f"centered_clip: the saved centre has {self.center.shape[0]} entries; the updates have "
                f"{updates.shape[1]} (a state from another model?)"
            )
        start = self.center if self.center is not None else torch.zeros(updates.shape[1], dtype=torch.float64)
        v, factors = centered_clip(updates, start, self.options.tau, self.options.iters)
        w = uniform_weights(inputs.n)
        new = weighted_average(inputs.client_states, w)
        new[mask] = add_scaled(inputs.global_state[mask], v, 1.0).to(new.dtype)
        new = finite_global(new, self.name)
        self.center = v.cpu()
        return Aggregate(
            global_state=new,
            weights=w,
            accepted=inputs.client_ids,
            diagnostics={
                "weights": as_weight_list(w, inputs.client_ids),
                "clip_factors": as_weight_list(factors, inputs.client_ids),
                "clipped": sorted(cid for cid, c in zip(inputs.client_ids, factors.tolist()) if c < 1.0),
                "center_norm": float(torch.linalg.vector_norm(v)),
            },
        )
