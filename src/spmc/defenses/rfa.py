"""RFA: robust federated aggregation by the smoothed geometric median of the updates (spec §6.5, D21, D31).

Points are the client updates Δ_k, prior weights p_k = n_k / Σ_j n_j. Smoothed Weiszfeld iteration
(Pillutla, Kakade, Harchaoui; the reference code's ``geometric_median_update``):

    z ← Σ_k p_k Δ_k                                              (start at the weighted mean)
    repeat up to maxiter times:
        β_k = p_k / max(ε, ‖z − Δ_k‖) ;  β ← β / Σ_j β_j ;  z ← Σ_k β_k Δ_k
        stop when |obj_prev − obj| < ftol · obj,   obj(z) = Σ_k p_k ‖z − Δ_k‖
    θ_g ← θ_g + z

``rfa_layerwise = True`` (the repo, spec [REC]) runs this separately on every parameter and float-buffer tensor;
``False`` runs it once on the whole vector of float entries (the original). The integer counters never enter a
median: they get the plain p-weighted mean of the clients' values (spec §6.5 "skip the integer buffer").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from spmc.defenses._options import check_bool, check_int, check_real, exclude_int_buffers_option
from spmc.defenses.base import Aggregate, RoundInputs, as_weight_list, finite_global, stat_mask, weighted_average
from spmc.defenses.fedavg import fedavg_weights
from spmc.defenses.linalg import column_slices
from spmc.options import option
from spmc.params import EntryKind

_TINY = float(torch.finfo(torch.float64).tiny)


def _weighted_sum(points: torch.Tensor, weights: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Σ_k w_k P_k / scale in float64, streamed over column blocks (no [n, m] float64 copy)."""
    w = weights.to(torch.float64).to(points.device)
    out = torch.empty(points.shape[1], dtype=torch.float64, device=points.device)
    for cols in column_slices(points.shape[1]):
        out[cols] = w @ (points[:, cols].to(torch.float64) / scale)
    return out


def _distances(points: torch.Tensor, z: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """‖z − P_k / scale‖ for every row k, float64 [n] on the CPU."""
    sq = torch.zeros(points.shape[0], dtype=torch.float64, device=points.device)
    for cols in column_slices(points.shape[1]):
        diff = points[:, cols].to(torch.float64) / scale - z[cols]
        sq += (diff * diff).sum(dim=1)
    return sq.sqrt().cpu()


def weiszfeld(
    points: torch.Tensor,
    weights: torch.Tensor,
    maxiter: int = 3,
    eps: float = 1e-5,
    ftol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Smoothed Weiszfeld geometric median of the rows of ``points`` [n, m] with prior ``weights`` [n].

    Returns (z float64 [m], β float64 [n] with z = Σ β_k P_k, number of Weiszfeld steps taken). β is the prior
    itself when no step was taken. The iteration runs on P / s and ε / s for a power of two s near max |P| (the same
    iterates, rescaled), so distances never overflow or underflow; when ε / s overflows every distance is below ε
    and β = p.
    """
    if points.dim() != 2 or weights.shape != (points.shape[0],):
        raise ValueError(f"points must be [n, m] and weights [n]; got {tuple(points.shape)}, {tuple(weights.shape)}")
    p = weights.to(torch.float64).cpu()
    if bool((p < 0).any()) or float(p.sum()) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum; got {p.tolist()}")
    p = p / p.sum()
    _, exponent = math.frexp(float(points.abs().amax())) if points.numel() else (0.0, 1)
    scale = math.ldexp(1.0, exponent - 1)  # a power of two near max |P|: the iteration runs on P / scale
    eps_scaled = max(eps / scale, _TINY)
    beta = p
    z = _weighted_sum(points, beta, scale)
    obj = float(p @ _distances(points, z, scale))
    steps = 0
    for _ in range(maxiter):
        prev_obj = obj
        beta = p / _distances(points, z, scale).clamp_min(eps_scaled) if math.isfinite(eps_scaled) else p
        beta = beta / beta.sum()
        z = _weighted_sum(points, beta, scale)
        steps += 1
        obj = float(p @ _distances(points, z, scale))
        if abs(prev_obj - obj) < ftol * obj:
            break
    return z * scale, beta, steps


def rfa_update(
    updates: torch.Tensor,
    weights: torch.Tensor,
    groups: Sequence[slice | torch.Tensor],
    maxiter: int = 3,
    eps: float = 1e-5,
    ftol: float = 1e-6,
) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    """The geometric-median update z over the given groups of columns (one group per tensor, or one for all).

    ``groups`` gives, for each group, the column slice or index tensor it covers; columns outside every group
    stay 0. Returns (z float64 [d], β per group, steps per group).
    """
    z = torch.zeros(updates.shape[1], dtype=torch.float64, device=updates.device)
    betas: list[torch.Tensor] = []
    steps: list[int] = []
    for cols in groups:
        zi, beta, k = weiszfeld(updates[:, cols], weights, maxiter, eps, ftol)
        z[cols] = zi
        betas.append(beta)
        steps.append(k)
    return z, betas, steps


@dataclass(frozen=True)
class RFAOptions:
    """RFA's options (``rfa_*``), integer counters left out."""

    layerwise: bool = option(
        True,
        key="rfa_layerwise",
        help="geometric median per state tensor (repo) or of the whole vector (original) (ALGORITHMS.md §6.5, D21)",
    )
    maxiter: int = option(3, key="rfa_maxiter", help="Weiszfeld iterations at most; integer >= 1 (ALGORITHMS.md §6.5)")
    eps: float = option(1e-5, key="rfa_eps", help="smoothing ν: distances floored at it; > 0 (ALGORITHMS.md §6.5)")
    ftol: float = option(
        1e-6, key="rfa_ftol", help="stop when the objective changes by < ftol × objective; >= 0 (ALGORITHMS.md §6.5)"
    )
    exclude_int_buffers: bool = exclude_int_buffers_option()

    def __post_init__(self) -> None:
        check_bool("rfa_layerwise", self.layerwise)
        check_int("rfa_maxiter", self.maxiter, 1)
        check_real("rfa_eps", self.eps, gt=0.0)
        check_real("rfa_ftol", self.ftol, ge=0.0)
        check_bool("exclude_int_buffers", self.exclude_int_buffers)


class RFA:
    """Geometric median of the updates by a few smoothed Weiszfeld steps, per tensor or over the whole vector."""

    name: ClassVar[str] = "rfa"
    description: ClassVar[str] = "RFA: smoothed Weiszfeld geometric median of the updates, per tensor (spec §6.5)"
    needs_server_data: ClassVar[bool] = False
    options_type: ClassVar[type[RFAOptions]] = RFAOptions

    def __init__(self, options: RFAOptions | None = None) -> None:
        self.options = options if options is not None else RFAOptions()

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        layout = inputs.layout
        device = inputs.client_states.device
        p = fedavg_weights(inputs.num_samples, "samples")
        updates = inputs.updates
        if self.options.layerwise:
            groups: list[slice | torch.Tensor] = [e.slice for e in layout.entries if e.kind is not EntryKind.INT_BUFFER]
            names = [e.name for e in layout.entries if e.kind is not EntryKind.INT_BUFFER]
        else:
            groups = [stat_mask(layout, self.options.exclude_int_buffers, device).nonzero().squeeze(1)]
            names = ["all"]
        z, betas, steps = rfa_update(updates, p, groups, self.options.maxiter, self.options.eps, self.options.ftol)
        new = inputs.global_state.to(torch.float64) + z
        covered = torch.zeros(layout.dim, dtype=torch.bool, device=device)
        for cols in groups:
            covered[cols] = True
        if not bool(covered.all()):
            rest = ~covered
            new[rest] = weighted_average(inputs.client_states[:, rest], p.to(device)).to(torch.float64)
        weights = None if self.options.layerwise else betas[0]
        diagnostics: dict[str, Any] = {
            "prior_weights": as_weight_list(p, inputs.client_ids),
            "steps": dict(zip(names, steps)),
        }
        if weights is not None:
            diagnostics["weights"] = as_weight_list(weights, inputs.client_ids)
        return Aggregate(
            global_state=finite_global(new.to(inputs.global_state.dtype), self.name),
            weights=weights,
            accepted=inputs.client_ids,
            diagnostics=diagnostics,
        )
