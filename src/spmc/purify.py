"""SPMC client side: distillation loss and per-tensor gradient projection (spec §4.2-§4.4, D5, D6, D7).

For every trainable tensor w, with G_d = ∇_w L_CE and G_g = ∇_w L_KD flattened:

    if ‖G_d‖ > 0 and ‖G_g‖ > 0 and ⟨G_d, G_g⟩ < 0:
        w.grad = G_d − λ · ⟨G_d, G_g⟩ / ‖G_g‖^p · G_g        (p = ``spmc_proj_norm_power``, 2 in the code, D5)
    else:
        w.grad = G_d

``granularity = "model"`` applies the same rule once to all tensors concatenated (D6 alternative).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

Granularity = Literal["tensor", "model"]


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """L_KD = −(1/B) Σ_b Σ_c softmax(z̃_b/T)_c · log softmax(z_b)_c · T² (spec §4.2).

    Only the teacher is divided by T, as in the reference code; at T = 1 its gradient in z is
    (softmax(z) − softmax(z̃))/B.
    """
    return distillation_terms(student_logits, teacher_logits, temperature).mean() * temperature**2


def distillation_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """−Σ_c softmax(z̃/T)_c · log softmax(z)_c for every sample (classes on the last axis): the summands of
    :func:`distillation_loss` before the mean and the T² factor, for engines that average per client or mask."""
    target = torch.softmax(teacher_logits.detach() / temperature, dim=-1)
    return -(target * F.log_softmax(student_logits, dim=-1)).sum(dim=-1)


def _segment_sums(
    grads_ce: torch.Tensor, grads_kd: torch.Tensor, segments: torch.Tensor, num_segments: int
) -> torch.Tensor:
    """[3, C, S]: ⟨G_d, G_g⟩, ‖G_g‖² and ‖G_d‖² per (client, tensor), in the gradients' dtype."""
    c = grads_ce.shape[0]
    sums = torch.zeros(3, c, num_segments, dtype=grads_ce.dtype, device=grads_ce.device)
    sums[0].index_add_(1, segments, grads_ce * grads_kd)
    sums[1].index_add_(1, segments, grads_kd * grads_kd)
    sums[2].index_add_(1, segments, grads_ce * grads_ce)
    return sums


def _in_range(sums: torch.Tensor) -> bool:
    """Whether sums formed in a narrow dtype are trustworthy: all finite, and every squared norm far enough above
    the dtype's smallest normal number (1e8 × tiny) that the squares of its dominant entries did not underflow."""
    floor = torch.finfo(sums.dtype).tiny * 1e8
    return bool(torch.isfinite(sums).all() & (sums[1:] >= floor).all())


def _project_with(
    grads_ce: torch.Tensor, grads_kd: torch.Tensor, sums: torch.Tensor, segments: torch.Tensor, lam: float, p: float
) -> torch.Tensor:
    """G_d − coef·G_g with coef = λ·⟨G_d, G_g⟩/‖G_g‖^p on conflicting (client, tensor) pairs, 0 elsewhere.

    ``sums`` may be wider than the gradients (float64 for float32 gradients): coef is then applied as
    (c_lo · G_g) · c_hi, with c_hi a power of two near √|coef| and c_lo = coef / c_hi, so a coefficient outside the
    gradients' range (G_d and G_g of very different sizes) still gives the wide result.
    """
    dot, g_norm_sq, d_norm_sq = sums
    conflict = (dot < 0) & (g_norm_sq > 0) & (d_norm_sq > 0)
    denom = torch.where(conflict, g_norm_sq.pow(p / 2), torch.ones_like(g_norm_sq))
    coef = torch.where(conflict, lam * dot / denom, torch.zeros_like(dot))
    if coef.dtype == grads_ce.dtype:
        return grads_ce - coef[:, segments] * grads_kd
    _, exponent = torch.frexp(coef)
    half = torch.ldexp(torch.ones_like(coef), torch.div(exponent, 2, rounding_mode="floor").clamp(-126, 127))
    big = torch.finfo(grads_ce.dtype).max
    c_hi = half.to(grads_ce.dtype)
    c_lo = (coef / half).clamp(-big, big).to(grads_ce.dtype)
    return grads_ce - (c_lo[:, segments] * grads_kd) * c_hi[:, segments]


def project_rows(
    grads_ce: torch.Tensor,
    grads_kd: torch.Tensor,
    segments: torch.Tensor,
    num_segments: int,
    lam: float = 1.0,
    norm_power: float = 2.0,
) -> torch.Tensor:
    """The rule of spec §4.3 for many clients and tensors at once.

    ``grads_ce`` and ``grads_kd`` are [C, d] (one row per client, all tensors concatenated); ``segments`` [d] gives
    the tensor index (0 … num_segments − 1) of every entry. Dots and norms are summed per (client, tensor); a
    conflicting pair gets G_d − λ·⟨G_d, G_g⟩/‖G_g‖^p · G_g, every other pair keeps G_d.

    The sums are formed in the gradients' dtype (the fast path, every ordinary step) and checked (one host
    synchronisation): when any is non-finite or a squared norm is near the dtype's underflow (float32 gradients
    below |g| ≈ 1e-15 or above ≈ 1e18), they are formed again in float64, so the gradient is projected exactly when
    the float64 formula says so.
    """
    sums = _segment_sums(grads_ce, grads_kd, segments, num_segments)
    if grads_ce.dtype != torch.float64 and not _in_range(sums):
        sums = _segment_sums(grads_ce.to(torch.float64), grads_kd.to(torch.float64), segments, num_segments)
    return _project_with(grads_ce, grads_kd, sums, segments, lam, norm_power)


def segment_ids(numels: Sequence[int], granularity: Granularity, device: torch.device | str = "cpu") -> torch.Tensor:
    """Tensor index of every entry of the concatenation of tensors of sizes ``numels`` (all 0 for ``model``)."""
    if granularity == "tensor":
        return torch.repeat_interleave(torch.arange(len(numels), device=device), torch.tensor(numels, device=device))
    if granularity == "model":
        return torch.zeros(sum(numels), dtype=torch.long, device=device)
    raise ValueError(f"spmc_proj_granularity: unknown value {granularity!r}; allowed: tensor, model")


def project_conflicting(
    grads_ce: Sequence[torch.Tensor],
    grads_kd: Sequence[torch.Tensor],
    lam: float = 1.0,
    norm_power: float = 2.0,
    granularity: Granularity = "tensor",
) -> list[torch.Tensor]:
    """Remove from each G_d the component that conflicts with G_g (spec §4.3), for one client's list of tensors.

    With λ = 1 and p = 2 a conflicting tensor's result is orthogonal to G_g; λ < 1 removes part of it; a zero
    norm on either side leaves G_d unchanged (the guard of spec §4.3). ``granularity = "model"`` applies the rule
    once to all tensors concatenated (D6).
    """
    if len(grads_ce) != len(grads_kd):
        raise ValueError(f"got {len(grads_ce)} CE gradients and {len(grads_kd)} KD gradients")
    numels = [d.numel() for d in grads_ce]
    segments = segment_ids(numels, granularity, grads_ce[0].device)
    flat = project_rows(
        torch.cat([d.reshape(1, -1) for d in grads_ce], dim=1),
        torch.cat([g.reshape(1, -1) for g in grads_kd], dim=1),
        segments,
        len(numels) if granularity == "tensor" else 1,
        lam,
        norm_power,
    )[0]
    return [piece.view_as(d) for piece, d in zip(flat.split(numels), grads_ce)]
