"""FedCPA: critical-parameter analysis (Han et al., ICCV'23; spec §6.11, the intended version with the write-back).

Computed on every weight tensor with 2 or 4 dimensions (linear and conv weights; every parameter if the model has
none), as the reference code ``Server/FedCPA.py`` does, with w̄ = (1/n) Σ_k w_k the uniform mean of the clients:

    global criticality  c_g = |(w̄ − w_g) ⊙ w̄| ;   local criticality  c_k = |(w_k − w̄) ⊙ w_k|
    T_k, B_k = index sets of the top and bottom ⌊r·m⌋ entries of c_k (r = ``fedcpa_top_rate``); T_g, B_g of c_g
    sim(a, b) = (ρ(T_a ∩ T_b) + ρ(B_a ∩ B_b)) / 2 + (J(T_a, T_b) + J(B_a, B_b)) / 2
        ρ(I) = (pearson(c_a[I], c_b[I]) + 1) / 2,   J(A, B) = |A ∩ B| / |A ∪ B|
    score_k = (1/n) Σ_j sim(k, j)  (sim(k, k) = 2)  +  sim(k, g)
    v = (score − min) / (max − min) ;  v = 1 → 0.99 ;  v = 0 → 0.01
    v ← ln(v / (1 − v)) + 0.5 ;  → 1 where infinite or > 1, → 0 where < 0
    K = {k : v_k ≠ 0} ;  θ_g ← (1/|K|) Σ_{k∈K} (θ_g + v_k Δ_k)        over the float entries of the state

The repo never writes the result into the global model (spec §6.11); this module does. Integer counters get the
plain mean of the kept clients. Where the repo would produce NaN (max = min, a Pearson correlation of a constant
or of fewer than two values) this module uses v_k = 1 for every client (the uniform mean) and ρ = 1/2 (zero
correlation) respectively. Clients are handled in ascending id order so that rounding cannot depend on the order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from spmc.defenses._options import check_real
from spmc.defenses.base import Aggregate, RoundInputs, as_weight_list, finite_global, weighted_average
from spmc.defenses.linalg import column_slices, gram
from spmc.options import option
from spmc.params import ParamLayout

log = logging.getLogger(__name__)


def critical_mask(layout: ParamLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """Entries of the 2-D and 4-D parameter tensors (all parameters if there are none), bool [d]."""
    mask = torch.zeros(layout.dim, dtype=torch.bool)
    for e in layout.params:
        if len(e.shape) in (2, 4):
            mask[e.slice] = True
    if not bool(mask.any()):
        mask = layout.param_mask().clone()
    return mask.to(device)


def criticality(weights: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """|(w − ref) ⊙ w| element-wise (rows of ``weights`` against one reference row)."""
    return ((weights - reference) * weights).abs()


def _k_smallest_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k smallest entries of the 1-D ``x``; among equal values the lowest positions win."""
    threshold = torch.kthvalue(x, k).values
    mask = x < threshold
    need = k - int(mask.sum())
    mask[(x == threshold).nonzero().squeeze(1)[:need]] = True
    return mask


def top_bottom_masks(crit: torch.Tensor, top_rate: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks of the ⌊r·m⌋ (at least 1) largest and smallest entries of each row of ``crit`` [n, m].

    Ties are broken by position (the lowest index first), so the sets are deterministic.
    """
    n, m = crit.shape
    k = max(1, int(m * top_rate))
    top = torch.stack([_k_smallest_mask(-crit[i], k) for i in range(n)])
    bottom = torch.stack([_k_smallest_mask(crit[i], k) for i in range(n)])
    return top, bottom


def pearson_matrix(x: torch.Tensor, mask: torch.Tensor, rel_tol: float = 1e-12) -> torch.Tensor:
    """ρ[i, j] = (pearson(x_i[I], x_j[I]) + 1) / 2 on I = mask_i ∩ mask_j, for all pairs of rows, float64 [n, n].

    All pairs come from one streamed pass of moment sums (four [n, n] matrix products per column block). Each row
    is first shifted by its own mean, which leaves the correlation unchanged and avoids cancellation. An undefined
    correlation (fewer than 2 shared entries, or a constant side) counts as 0, i.e. ρ = 1/2.
    """
    n = x.shape[0]
    shift = x.to(torch.float64).mean(dim=1, keepdim=True) if x.shape[1] else torch.zeros(n, 1, dtype=torch.float64)
    cnt, sx, sxx, sxy = (torch.zeros(n, n, dtype=torch.float64, device=x.device) for _ in range(4))
    for cols in column_slices(x.shape[1]):
        xs = x[:, cols].to(torch.float64) - shift
        mf = mask[:, cols].to(torch.float64)
        xm = xs * mf
        cnt += mf @ mf.T
        sx += xm @ mf.T
        sxx += (xs * xm) @ mf.T
        sxy += xm @ xm.T
    safe = cnt.clamp_min(1.0)
    cov = sxy - sx * sx.T / safe
    var_x = sxx - sx * sx / safe
    var_y = var_x.T
    defined = (cnt >= 2) & (var_x > rel_tol * sxx) & (var_y > rel_tol * sxx.T)
    r = torch.where(defined, cov / (var_x * var_y).clamp_min(1e-300).sqrt(), torch.zeros_like(cov))
    return ((r.clamp(-1.0, 1.0) + 1.0) / 2.0).cpu()


def jaccard_matrix(mask: torch.Tensor) -> torch.Tensor:
    """J[i, j] = |A_i ∩ A_j| / |A_i ∪ A_j| for the boolean rows of ``mask`` (1 for two empty sets), float64."""
    inter = gram(mask)
    size = inter.diagonal()
    union = size.unsqueeze(1) + size.unsqueeze(0) - inter
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(inter)).cpu()


def similarity_matrix(crit: torch.Tensor, top_rate: float = 0.5) -> torch.Tensor:
    """sim(a, b) = (ρ_top + ρ_bottom) / 2 + (J_top + J_bottom) / 2 for all pairs of rows of ``crit``, float64."""
    top, bottom = top_bottom_masks(crit, top_rate)
    corr = (pearson_matrix(crit, top) + pearson_matrix(crit, bottom)) / 2
    return corr + (jaccard_matrix(top) + jaccard_matrix(bottom)) / 2


def fedcpa_scores(crit: torch.Tensor, global_crit: torch.Tensor, top_rate: float = 0.5) -> torch.Tensor:
    """score_k = mean_j sim(k, j) (with sim(k, k) = 2) + sim(k, global), float64 [n]."""
    n = crit.shape[0]
    sim = similarity_matrix(torch.cat([crit, global_crit.unsqueeze(0)]), top_rate)
    pair = sim[:n, :n].clone()
    pair.fill_diagonal_(2.0)
    return pair.mean(dim=1) + sim[:n, n]


def fedcpa_logit_weights(scores: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """v from the scores by min-max scaling and the logit (module docstring); (ones, True) when max = min."""
    s = scores.to(torch.float64)
    spread = float(s.max() - s.min())
    if not spread > 0:
        return torch.ones_like(s), True
    v = (s - s.min()) / spread
    v[v == 1] = 0.99
    v[v == 0] = 0.01
    v = torch.log(v / (1 - v)) + 0.5
    v[torch.isinf(v) | (v > 1)] = 1.0
    v[v < 0] = 0.0
    return v, False


def fedcpa_aggregate(
    global_state: torch.Tensor, client_states: torch.Tensor, v: torch.Tensor, int_mask: torch.Tensor
) -> torch.Tensor:
    """θ_g + (1/|K|) Σ_{k∈K} v_k Δ_k on the float entries, the plain mean of the kept clients on the integer ones."""
    kept = v != 0
    coef = torch.where(kept, v, torch.zeros_like(v)) / int(kept.sum())
    new = weighted_average(client_states, coef.to(client_states.device)).to(torch.float64)
    new += (1.0 - float(coef.sum())) * global_state.to(torch.float64)
    if bool(int_mask.any()):
        plain = kept.to(torch.float64) / int(kept.sum())
        new[int_mask] = weighted_average(client_states[:, int_mask], plain.to(client_states.device)).to(torch.float64)
    return new.to(global_state.dtype)


@dataclass(frozen=True)
class FedCPAOptions:
    """FedCPA's option: the fraction of coordinates counted as critical."""

    top_rate: float = option(
        0.5, key="fedcpa_top_rate", help="fraction of coordinates counted as critical, in (0, 1] (ALGORITHMS.md §6.11)"
    )

    def __post_init__(self) -> None:
        check_real("fedcpa_top_rate", self.top_rate, gt=0.0, le=1.0)


class FedCPA:
    """Scores clients by the overlap of their critical parameters, then FoolsGold-style logit weights."""

    name: ClassVar[str] = "fedcpa"
    description: ClassVar[str] = "FedCPA: critical-parameter similarity with logit weights (spec §6.11)"
    needs_server_data: ClassVar[bool] = False
    options_type: ClassVar[type[FedCPAOptions]] = FedCPAOptions

    def __init__(self, options: FedCPAOptions | None = None) -> None:
        self.options = options if options is not None else FedCPAOptions()

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        states = inputs.client_states
        ids = inputs.client_ids
        order = sorted(range(inputs.n), key=lambda i: ids[i])
        sel = critical_mask(inputs.layout, states.device)
        w_g = inputs.global_state[sel]
        total = torch.zeros(int(sel.sum()), dtype=torch.float64, device=states.device)
        for i in order:
            total += states[i, sel].to(torch.float64)
        w_bar = (total / inputs.n).to(states.dtype)
        crit = torch.stack([criticality(states[i, sel], w_bar) for i in order])
        scores_sorted = fedcpa_scores(crit, criticality(w_bar, w_g), self.options.top_rate)
        scores = torch.empty_like(scores_sorted)
        scores[torch.tensor(order)] = scores_sorted
        v, fallback = fedcpa_logit_weights(scores)
        if fallback:
            log.info("fedcpa: all scores equal in round %d; uniform mean", inputs.round)
        int_mask = inputs.layout.int_mask(states.device)
        new = fedcpa_aggregate(inputs.global_state, states, v, int_mask)
        weights = v / v.sum()
        accepted = tuple(cid for cid, x in zip(ids, v.tolist()) if x != 0)
        return Aggregate(
            global_state=finite_global(new, self.name),
            weights=weights,
            accepted=accepted,
            diagnostics={
                "weights": as_weight_list(weights, ids),
                "logit_weights": as_weight_list(v, ids),
                "scores": as_weight_list(scores, ids),
                "removed": [cid for cid in ids if cid not in accepted],
                "uniform_fallback": fallback,
            },
        )
