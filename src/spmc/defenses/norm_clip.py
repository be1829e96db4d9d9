"""Norm clipping (Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?", arXiv 1911.07963,
2019; ATTACKS.md §A6).

On the updates u_k = θ_k − θ_g restricted to the float entries (integer counters left out, spec D31):

    M     = ``clip_norm``, or the median of ‖u_k‖ over the round's clients when it is None ([REC] ``auto``)
    c_k   = min(1, M / ‖u_k‖)              (1 for a zero update)
    θ_g  ← θ_g + (1/n) Σ_k c_k u_k          (float entries)
    θ_g  ← (1/n) Σ_k θ_k                     (integer counters, the plain mean)

The mean is uniform, as in the paper (every client has the same weight; sample counts are ignored), so that no
client can buy influence by claiming many samples. The median is the usual one (the mean of the two middle values
for an even n).

The clipping itself (:func:`clip_factors` over :func:`scaled_row_norms`) is shared by ``weak_dp``,
``centered_clip`` and ``signguard``. Norms are computed on rows divided by one common power of two (exact), so that
no finite update, however large, overflows a norm: every ratio between norms, hence every clip factor, is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from spmc.defenses.base import (
    Aggregate,
    RoundInputs,
    as_weight_list,
    finite_global,
    stat_mask,
    weighted_average,
)
from spmc.defenses.linalg import column_slices
from spmc.options import option

_BLOCK = 1 << 16


def power_of_two_scale(*tensors: torch.Tensor) -> float:
    """S = 2^(e−1) where 2^e > max |x| ≥ 2^(e−1) over every entry of ``tensors`` (1.0 when they are all zero or
    empty); never 0 or inf.

    Dividing by S is exact and brings every entry into (−2, 2), so sums of squares cannot overflow."""
    peak = 0.0
    for t in tensors:
        if t.numel():
            peak = max(peak, float(t.detach().abs().max().to(torch.float64)))
    if peak == 0.0:
        return 1.0
    _, exponent = math.frexp(peak)
    return math.ldexp(1.0, exponent - 1)


def scaled_row_norms(
    vectors: torch.Tensor, scale: float, center: torch.Tensor | None = None, block: int = _BLOCK
) -> torch.Tensor:
    """‖(x_k − c) / S‖ for the rows x_k of ``vectors`` [n, d] (c = ``center`` [d], or 0), S = ``scale``; float64 [n]
    on the CPU, accumulated over column blocks (no [n, d] float64 copy)."""
    if vectors.dim() != 2:
        raise ValueError(f"vectors must be [n, d]; got shape {tuple(vectors.shape)}")
    sq = torch.zeros(vectors.shape[0], dtype=torch.float64, device=vectors.device)
    for cols in column_slices(vectors.shape[1], block):
        part = vectors[:, cols].to(torch.float64) / scale
        if center is not None:
            part = part - center[cols].to(device=vectors.device, dtype=torch.float64) / scale
        sq += (part * part).sum(dim=1)
    return sq.sqrt().cpu()


def scaled_combination(
    vectors: torch.Tensor,
    coeffs: torch.Tensor,
    scale: float,
    center: torch.Tensor | None = None,
    block: int = _BLOCK,
) -> torch.Tensor:
    """Σ_k a_k (x_k − c) / S for the rows of ``vectors`` [n, d], a = ``coeffs`` [n], c = ``center`` [d] or 0, S =
    ``scale``; float64 [d] on the device of ``vectors``, accumulated over column blocks."""
    a = coeffs.to(device=vectors.device, dtype=torch.float64)
    out = torch.empty(vectors.shape[1], dtype=torch.float64, device=vectors.device)
    for cols in column_slices(vectors.shape[1], block):
        part = vectors[:, cols].to(torch.float64) / scale
        if center is not None:
            part = part - center[cols].to(device=vectors.device, dtype=torch.float64) / scale
        out[cols] = a @ part
    return out


def add_scaled(base: torch.Tensor, step: torch.Tensor, scale: float) -> torch.Tensor:
    """base + S·step in float64 without an intermediate overflow (``step`` in units of S = ``scale``); inf only
    where the sum itself exceeds the float64 range."""
    b = base.to(torch.float64)
    if scale <= 1.0:
        return b + step * scale
    return (b / scale + step) * scale


def clip_factors(norms: torch.Tensor, bound: float) -> torch.Tensor:
    """c_k = min(1, bound / ‖u_k‖): 1 where the norm is at most ``bound`` (a zero norm included), bound / norm
    elsewhere; float64, same shape as ``norms``. ``bound`` = inf never clips."""
    n = norms.to(torch.float64)
    safe = torch.where(n > bound, n, torch.ones_like(n))
    return torch.where(n > bound, bound / safe, torch.ones_like(n))


def median(values: torch.Tensor) -> float:
    """The median of a 1-D tensor: the middle value, or the mean of the two middle values for an even length."""
    if values.numel() == 0:
        raise ValueError("median of no values")
    s = values.to(torch.float64).flatten().sort().values
    mid = s.numel() // 2
    if s.numel() % 2:
        return float(s[mid])
    return float(s[mid - 1] / 2 + s[mid] / 2)


def clipped_mean_state(
    inputs: RoundInputs,
    weights: torch.Tensor,
    bound: float | None,
    exclude_int_buffers: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The new global state θ_g + Σ_k w_k c_k u_k on the float entries (the plain Σ_k w_k θ_k on the integer
    counters), with c_k = min(1, M/‖u_k‖) and M = ``bound`` or the median ‖u_k‖ over every client when None.

    Returns (state in the states' dtype, possibly non-finite; the clip factors c, float64 [n]; M). ``weights`` [n]
    must sum to 1 (zero for clients left out)."""
    mask = stat_mask(inputs.layout, exclude_int_buffers, inputs.client_states.device)
    updates = inputs.updates[:, mask]
    scale = power_of_two_scale(updates)
    norms = scaled_row_norms(updates, scale)
    m_scaled = median(norms) if bound is None else bound / scale
    factors = clip_factors(norms, m_scaled)
    step = scaled_combination(updates, weights.to(torch.float64) * factors, scale)
    new = weighted_average(inputs.client_states, weights.to(torch.float64))
    new[mask] = add_scaled(inputs.global_state[mask], step, scale).to(new.dtype)
    return new, factors, m_scaled * scale


def uniform_weights(n: int) -> torch.Tensor:
    """1/n for each of n clients, float64."""
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


def clip_diagnostics(factors: torch.Tensor, bound: float, client_ids: Sequence[int]) -> dict[str, object]:
    """The clip bound M, the clip factors c_k and the clients whose update was shortened, for the run log."""
    return {
        "clip_norm": bound,
        "clip_factors": as_weight_list(factors, client_ids),
        "clipped": sorted(cid for cid, c in zip(client_ids, factors.tolist()) if c < 1.0),
    }


def check_clip_norm(value: float | None, key: str = "clip_norm") -> None:
    """Raise unless ``value`` is None (auto: the round's median norm) or a finite number > 0."""
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{key}: got {value!r}; must be a finite number > 0, or None (auto: the median update norm)")


@dataclass(frozen=True)
class NormClipOptions:
    """Norm clipping's options: the bound M (None: the round's median update norm), integer counters left out."""

    clip_norm: float | None = option(
        None,
        "clip_norm",
        "norm_clip / weak_dp: clip every update to this L2 norm (> 0); None = auto, the round's median update norm "
        "(Sun et al. 2019; ATTACKS.md §A6)",
    )
    exclude_int_buffers: bool = option(
        True,
        "exclude_int_buffers",
        "leave integer counters (BN's num_batches_tracked) out of vector statistics (spec D31)",
    )

    def __post_init__(self) -> None:
        check_clip_norm(self.clip_norm)


class NormClip:
    """Clip every update to the norm M, then take the uniform mean."""

    name: ClassVar[str] = "norm_clip"
    description: ClassVar[str] = "Norm clipping: every update clipped to M (default: the median norm), uniform mean"
    needs_server_data: ClassVar[bool] = False
    options_type: ClassVar[type[NormClipOptions]] = NormClipOptions

    def __init__(self, options: NormClipOptions | None = None) -> None:
        self.options = options if options is not None else NormClipOptions()

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        w = uniform_weights(inputs.n)
        new, factors, bound = clipped_mean_state(inputs, w, self.options.clip_norm, self.options.exclude_int_buffers)
        return Aggregate(
            global_state=finite_global(new, self.name),
            weights=w,
            accepted=inputs.client_ids,
            diagnostics={"weights": as_weight_list(w, inputs.client_ids)}
            | clip_diagnostics(factors, bound, inputs.client_ids),
        )
