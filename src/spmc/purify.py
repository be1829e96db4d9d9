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
    target = torch.softmax(teacher_logits.detach() / temperature, dim=1)
    return -(target * F.log_softmax(student_logits, dim=1)).sum(dim=1).mean() * temperature**2


def project_rows(
    grads_ce: torch.Tensor,
    grads_kd: torch.Tensor,
    segments: torch.Tensor,
    num_segments: int,
    lam: float = 1.0,
    norm_power: float = 2.0,
) -> torch.Tensor:
    """The rule of spec §4.3 for many clients and tensors at once, without host synchronisation.

    ``grads_ce`` and ``grads_kd`` are [C, d] (one row per client, all tensors concatenated); ``segments`` [d] gives
    the tensor index (0 … num_segments − 1) of every entry. Dots and norms are summed per (client, tensor); a
    conflicting pair gets G_d − λ·⟨G_d, G_g⟩/‖G_g‖^p · G_g, every other pair keeps G_d.

    Products and sums are formed in float64, so float32 gradients are projected exactly when the float64 formula
    says so: their squares neither underflow (|g| ≲ 1e-20) nor overflow (|g| ≳ 1e18) there. The update is applied
    in the gradients' dtype as (c_lo · G_g) · c_hi with c_hi a power of two near √|coef| and c_lo = coef / c_hi, so a
    coefficient outside the float32 range (G_d and G_g of very different sizes) still gives the float64 result,
    while in range the result is bit-identical to coef · G_g in that dtype.
    """
    c = grads_ce.shape[0]
    ce, kd = grads_ce.to(torch.float64), grads_kd.to(torch.float64)
    sums = torch.zeros(3, c, num_segments, dtype=torch.float64, device=grads_ce.device)
    sums[0].index_add_(1, segments, ce * kd)
    sums[1].index_add_(1, segments, kd * kd)
    sums[2].index_add_(1, segments, ce * ce)
    dot, g_norm_sq, d_norm_sq = sums
    conflict = (dot < 0) & (g_norm_sq > 0) & (d_norm_sq > 0)
    denom = torch.where(conflict, g_norm_sq.pow(norm_power / 2), torch.ones_like(g_norm_sq))
    coef = torch.where(conflict, lam * dot / denom, torch.zeros_like(dot))
    _, exponent = torch.frexp(coef)
    half = torch.ldexp(torch.ones_like(coef), torch.div(exponent, 2, rounding_mode="floor").clamp(-126, 127))
    big = torch.finfo(grads_ce.dtype).max
    c_hi = half.to(grads_ce.dtype)
    c_lo = (coef / half).clamp(-big, big).to(grads_ce.dtype)
    return grads_ce - (c_lo[:, segments] * grads_kd) * c_hi[:, segments]


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
