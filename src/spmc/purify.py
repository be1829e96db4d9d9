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


def _project_pair(g_d: torch.Tensor, g_g: torch.Tensor, lam: float, norm_power: float) -> torch.Tensor:
    dot = (g_d * g_g).sum()
    g_norm_sq = (g_g * g_g).sum()
    conflict = (dot < 0) & (g_norm_sq > 0) & ((g_d * g_d).sum() > 0)
    denom = torch.where(conflict, g_norm_sq.pow(norm_power / 2), torch.ones_like(g_norm_sq))
    coef = torch.where(conflict, lam * dot / denom, torch.zeros_like(dot))
    return g_d - coef * g_g


def project_conflicting(
    grads_ce: Sequence[torch.Tensor],
    grads_kd: Sequence[torch.Tensor],
    lam: float = 1.0,
    norm_power: float = 2.0,
    granularity: Granularity = "tensor",
) -> list[torch.Tensor]:
    """Remove from each G_d the component that conflicts with G_g (spec §4.3); no host synchronisation.

    With λ = 1 and p = 2 a conflicting tensor's result is orthogonal to G_g; λ < 1 removes part of it; a zero
    norm on either side leaves G_d unchanged (the guard of spec §4.3).
    """
    if len(grads_ce) != len(grads_kd):
        raise ValueError(f"got {len(grads_ce)} CE gradients and {len(grads_kd)} KD gradients")
    if granularity == "tensor":
        return [_project_pair(d, g, lam, norm_power) for d, g in zip(grads_ce, grads_kd)]
    if granularity == "model":
        flat = _project_pair(
            torch.cat([d.reshape(-1) for d in grads_ce]), torch.cat([g.reshape(-1) for g in grads_kd]), lam, norm_power
        )
        return [piece.view_as(d) for piece, d in zip(flat.split([d.numel() for d in grads_ce]), grads_ce)]
    raise ValueError(f"spmc_proj_granularity: unknown value {granularity!r}; allowed: tensor, model")
