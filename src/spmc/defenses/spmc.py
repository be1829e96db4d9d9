"""SPMC server: aggregation weighted by margin contribution (spec §3, §4.1, D3, D4, D8, D9, D29).

For client k with score vector a_k and leave-one-out coalition b_k = Σ_{j≠k} w_j a_j / Σ_{j≠k} w_j (prior
weights w, uniform by default):

    s_k = ⟨a_k, b_k⟩ / (‖a_k‖·‖b_k‖ + ε)                                   (spec §3.2 step 2)
    α   = softmax(s / τ)                  (``spmc_weight_fn = softmax``, spec §3.2 step 3)
    α_k ∝ σ(−(max_j s_j − s_k) / τ)       (``spmc_weight_fn = sigmoid``, the seed's σ read as the logistic, D3)
    θ_g ← Σ_k α_k θ_k over the whole state                                  (spec §3.2 step 4)
    teacher_k = (θ_g − α_k θ_k)/(1 − α_k) = Σ_{j≠k} α_j θ_j / Σ_{j≠k} α_j    (spec §4.1)

Scores and teachers are computed in O(n·d), streamed over column blocks in float64 (no [n, d] float64 copy), from
prefix and suffix sums over the clients rather than the closed form (S − w_k a_k)/(W − w_k) of spec §3.3, which
cancels catastrophically when one client dwarfs the others (issue 11); every sum is rescaled so no finite input
overflows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import torch

from spmc.defenses._options import check_choice, check_real
from spmc.defenses.base import Aggregate, RoundInputs, as_weight_list, weighted_average
from spmc.defenses.linalg import column_slices
from spmc.options import option

WeightFn = Literal["softmax", "sigmoid"]
ScoreRef = Literal["loo", "global"]
ScoreSpace = Literal["params", "updates"]
LooPrior = Literal["uniform", "samples"]


def _row_scales(vectors: torch.Tensor) -> torch.Tensor:
    """c_k = max_i |a_ki| of every row, streamed over column blocks (exact in any dtype); float64 [n] on the CPU.

    Raises ``ValueError`` when a row holds inf or NaN.
    """
    c = torch.zeros(vectors.shape[0], dtype=torch.float64, device=vectors.device)
    for cols in column_slices(vectors.shape[1]):
        c = torch.maximum(c, vectors[:, cols].abs().amax(dim=1).to(torch.float64))
    c = c.cpu()
    bad = (~torch.isfinite(c)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"vectors: rows {bad} hold inf or NaN; every entry must be finite")
    return c


def _others_sum(x: torch.Tensor) -> torch.Tensor:
    """o_k = Σ_{j≠k} x_j for every row of ``x`` [n, ...], from prefix and suffix sums: x_k is never subtracted."""
    out = torch.zeros_like(x)
    out[1:] = x[:-1].cumsum(dim=0)
    out[:-1] += x[1:].flip(0).cumsum(dim=0).flip(0)
    return out


def loo_cosine_scores(vectors: torch.Tensor, prior: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """s_k = ⟨a_k, b_k⟩ / (‖a_k‖·‖b_k‖ + ε), b_k = Σ_{j≠k} w_j a_j / Σ_{j≠k} w_j (spec §3.2-§3.3), float64 [n].

    ``vectors`` is [n, d] of any float dtype; ``prior`` w defaults to uniform weights. n = 1 has no coalition and
    returns [0.0]; a zero vector a_k or b_k gives s_k = 0 through ε (spec §3.4). The result is clamped to [−1, 1].

    Computed in O(n·d) time, streamed over column blocks in float64, without the cancelling closed form of §3.3:
    every row is divided by its own scale c_k = max |a_k| (u_k = a_k / c_k), the coalition sums
    o_k = Σ_{j≠k} (w_j c_j / M_k) u_j with M_k = max_{j≠k} w_j c_j come from prefix and suffix sums over the rows
    (a_k is never subtracted), and the cosine is rescaled exactly:

        s_k = ⟨u_k, o_k⟩ / (‖u_k‖·‖o_k‖ + ε · (Σ_{j≠k} w_j) / (c_k · M_k)).

    ε therefore keeps its absolute meaning in the units of the input; the factor is formed in logarithms, so it may
    be 0 or inf (then s_k → 0) but never NaN. No square overflows or underflows for any finite input.
    """
    if vectors.dim() != 2:
        raise ValueError(f"vectors must be [n, d]; got shape {tuple(vectors.shape)}")
    n = vectors.shape[0]
    w = torch.ones(n, dtype=torch.float64) if prior is None else prior.detach().to(torch.float64).cpu()
    if w.shape != (n,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"prior must be {n} finite non-negative weights; got {w.tolist()}")
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    w = w / w.max() if float(w.max()) > 0 else w
    rest = _others_sum(w)
    if bool((rest <= 0).any()):
        raise ValueError("prior: every leave-one-out coalition needs positive total weight")
    c = _row_scales(vectors)
    log_v = w.log() + c.log()  # log(w_j c_j), −inf for a zero row or a zero weight
    top = int(log_v.argmax())
    log_m = torch.full((n,), float(log_v[top]), dtype=torch.float64)
    log_m[top] = float(torch.cat([log_v[:top], log_v[top + 1 :]]).max())
    if not bool(torch.isfinite(log_m[0 if top else 1])):
        return torch.zeros(n, dtype=torch.float64)  # all rows with weight are zero
    coef = (log_v - log_m[0 if top else 1]).exp()  # w_j c_j / max_j w_j c_j, for every k but the top one
    coef_top = (log_v - log_m[top]).exp() if bool(torch.isfinite(log_m[top])) else torch.zeros(n, dtype=torch.float64)
    coef_top[top] = 0.0
    dev = vectors.device
    c_safe = torch.where(c > 0, c, torch.ones_like(c)).to(dev)
    coef, coef_top = coef.to(dev), coef_top.to(dev)
    dot = torch.zeros(n, dtype=torch.float64, device=dev)
    q = torch.zeros(n, dtype=torch.float64, device=dev)
    nb = torch.zeros(n, dtype=torch.float64, device=dev)
    for cols in column_slices(vectors.shape[1]):
        u = vectors[:, cols].to(torch.float64) / c_safe[:, None]
        o = _others_sum(u * coef[:, None])
        o[top] = coef_top @ u
        dot += (u * o).sum(dim=1)
        q += (u * u).sum(dim=1)
        nb += (o * o).sum(dim=1)
    dot, q, nb = dot.cpu(), q.cpu(), nb.cpu()
    eps_k = eps * (rest.log() - c.log() - log_m).exp() if eps > 0 else torch.zeros(n, dtype=torch.float64)
    denom = q.sqrt() * nb.sqrt() + eps_k
    s = torch.where(denom > 0, dot / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(dot))
    return s.clamp(-1.0, 1.0)


def reference_cosine_scores(vectors: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """s_k = ⟨a_k, r⟩ / (‖a_k‖·‖r‖ + ε) against one reference vector (``spmc_score_ref = global``, D4), float64."""
    a = vectors.to(torch.float64)
    r = reference.to(torch.float64)
    scores: torch.Tensor = ((a @ r) / (a.norm(dim=1) * r.norm() + eps)).cpu()
    return scores


def spmc_weights(scores: torch.Tensor, temperature: float = 1.0, fn: WeightFn = "softmax") -> torch.Tensor:
    """α from scores: softmax(s/τ), or σ(−(max s − s_k)/τ) normalised (spec §3.1-§3.2, D3); float64 [n]."""
    if temperature <= 0:
        raise ValueError(f"spmc_temperature: got {temperature}; must be > 0")
    s = scores.to(torch.float64) / temperature
    if fn == "softmax":
        return torch.softmax(s, dim=0)
    if fn == "sigmoid":
        a = torch.sigmoid(-(s.max() - s))
        return a / a.sum()
    raise ValueError(f"spmc_weight_fn: unknown value {fn!r}; allowed: softmax, sigmoid")


def marginal_teachers(global_state: torch.Tensor, client_states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """teacher_k = Σ_{j≠k} α_j θ_j / Σ_{j≠k} α_j, the α-weighted leave-one-out model of every client (spec §4.1).

    Equal to (θ_g − α_k θ_k)/(1 − α_k) for θ_g = Σ α_j θ_j, but formed directly: the coalition sums come from prefix
    and suffix sums over the rows and its weight Σ_{j≠k} α_j is a sum of the others' weights, so nothing is
    subtracted and the result stays accurate however close α_k is to 1. Each column block is divided by its largest
    |θ| while it is summed in float64, so no finite input overflows; the [n, d] result is in the states' dtype.

    A client whose coalition has weight exactly 0 gets ``global_state`` as its teacher: with n = 1 (no coalition,
    spec §3.4) and whenever every other client's weight is exactly 0 (a client-selecting defense such as Krum, or
    α_k = 1 after underflow), where θ_g = θ_k. ``global_state`` is only read in that case.
    """
    n = client_states.shape[0]
    if client_states.dim() != 2 or weights.shape != (n,):
        raise ValueError(
            f"weights has shape {tuple(weights.shape)} for client states of shape {tuple(client_states.shape)}; "
            f"expected [n] weights for [n, d] states"
        )
    w = weights.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"weights must be finite and non-negative; got {w.tolist()}")
    w = w / w.max() if float(w.max()) > 0 else w
    rest = _others_sum(w)
    alone = rest <= 0
    dev = client_states.device
    coef = w.to(dev)[:, None]
    inv_rest = torch.where(alone, torch.zeros_like(rest), 1.0 / torch.where(alone, torch.ones_like(rest), rest))
    inv_rest = inv_rest.to(dev)[:, None]
    teachers = torch.empty_like(client_states)
    for cols in column_slices(client_states.shape[1]):
        block = client_states[:, cols].to(torch.float64)
        scale = block.abs().amax(dim=0).clamp_min(torch.finfo(torch.float64).tiny)
        mean = _others_sum(block / scale * coef) * inv_rest * scale
        teachers[:, cols] = mean.to(client_states.dtype)
    alone_idx = alone.nonzero().flatten().tolist()
    if alone_idx:
        teachers[alone_idx] = global_state.to(client_states.dtype)
    return teachers


@dataclass(frozen=True)
class SPMCOptions:
    """SPMC's server options (``spmc_temperature``, ``spmc_weight_fn``, ``spmc_score_*``, ``spmc_loo_prior``)."""

    temperature: float = option(
        1.0, key="spmc_temperature", help="temperature τ of the weights α ∝ exp(s/τ), > 0 (ALGORITHMS.md §3.4, D3)"
    )
    weight_fn: WeightFn = option(
        "softmax",
        key="spmc_weight_fn",
        help="weights from the scores: softmax (the code's exp) or sigmoid (the seed's σ) (ALGORITHMS.md §3.2, D3)",
    )
    score_ref: ScoreRef = option(
        "loo",
        key="spmc_score_ref",
        help="score reference: loo (leave-one-out coalition) or global (the global model; needs "
        "spmc_score_space = params) (ALGORITHMS.md §3.2, D4)",
    )
    score_space: ScoreSpace = option(
        "params",
        key="spmc_score_space",
        help="scored vectors: params (raw parameters, the code's) or updates θ_k − θ_g (ALGORITHMS.md §3.2, D4)",
    )
    loo_prior: LooPrior = option(
        "uniform",
        key="spmc_loo_prior",
        help="prior weights of the leave-one-out coalition: uniform or samples (ALGORITHMS.md §3.3, D9)",
    )
    score_eps: float = option(
        1e-5, key="spmc_score_eps", help="ε in the cosine score's denominator, >= 0 (ALGORITHMS.md §3.2)"
    )

    def __post_init__(self) -> None:
        check_real("spmc_temperature", self.temperature, gt=0.0)
        check_choice("spmc_weight_fn", self.weight_fn, get_args(WeightFn))
        check_choice("spmc_score_ref", self.score_ref, get_args(ScoreRef))
        check_choice("spmc_score_space", self.score_space, get_args(ScoreSpace))
        check_choice("spmc_loo_prior", self.loo_prior, get_args(LooPrior))
        if self.score_ref == "global" and self.score_space == "updates":
            raise ValueError(
                "spmc_score_ref: 'global' compares client models with the global model and needs "
                "spmc_score_space = 'params' (the global model has no update of its own)"
            )
        check_real("spmc_score_eps", self.score_eps, ge=0.0)


class SPMC:
    """Margin-contribution aggregation; its weights also define the client-side teachers (spec §3, §4.1)."""

    name: ClassVar[str] = "spmc"
    description: ClassVar[str] = "SPMC: softmax of leave-one-out cosine scores, no attacker count (spec §3)"
    needs_server_data: ClassVar[bool] = False
    options_type: ClassVar[type[SPMCOptions]] = SPMCOptions

    def __init__(self, options: SPMCOptions | None = None) -> None:
        self.options = options if options is not None else SPMCOptions()

    def scores(self, inputs: RoundInputs) -> torch.Tensor:
        """s_k on vec_P of the states (or of the updates), against the LOO coalition or the global model (D4)."""
        mask = inputs.layout.param_mask(inputs.client_states.device)
        if inputs.layout.num_params == inputs.layout.dim:  # no buffers: skip the [n, d] masked copy
            vectors, reference = inputs.client_states, inputs.global_state
        else:
            vectors, reference = inputs.client_states[:, mask], inputs.global_state[mask]
        if self.options.score_space == "updates":
            vectors = vectors - reference
        if self.options.score_ref == "global":
            return reference_cosine_scores(vectors, reference, self.options.score_eps)
        prior = inputs.num_samples if self.options.loo_prior == "samples" else None
        return loo_cosine_scores(vectors, prior, self.options.score_eps)

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        if inputs.n == 1:
            w = torch.ones(1, dtype=torch.float64)
            s = torch.zeros(1, dtype=torch.float64)
        else:
            s = self.scores(inputs)
            w = spmc_weights(s, self.options.temperature, self.options.weight_fn)
        return Aggregate(
            global_state=weighted_average(inputs.client_states, w),
            weights=w,
            accepted=inputs.client_ids,
            diagnostics={
                "scores": as_weight_list(s, inputs.client_ids),
                "weights": as_weight_list(w, inputs.client_ids),
            },
        )
