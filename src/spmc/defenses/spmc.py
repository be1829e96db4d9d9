"""SPMC server: aggregation weighted by margin contribution (spec §3, §4.1, D3, D4, D8, D9, D29).

For client k with score vector a_k and leave-one-out coalition b_k = (S − w_k a_k)/(W − w_k), where
S = Σ_j w_j a_j and W = Σ_j w_j (prior weights w, uniform by default):

    s_k = ⟨a_k, b_k⟩ / (‖a_k‖·‖b_k‖ + ε)                                   (spec §3.2 step 2)
    α   = softmax(s / τ)                  (``spmc_weight_fn = softmax``, spec §3.2 step 3)
    α_k ∝ σ(−(max_j s_j − s_k) / τ)       (``spmc_weight_fn = sigmoid``, the seed's σ read as the logistic, D3)
    θ_g ← Σ_k α_k θ_k over the whole state                                  (spec §3.2 step 4)
    teacher_k = (θ_g − α_k θ_k)/(1 − α_k) = Σ_{j≠k} α_j θ_j / Σ_{j≠k} α_j    (spec §4.1)

All scores are computed in O(n·d) from G_k = ⟨a_k, S⟩, q_k = ‖a_k‖², Q = ‖S‖² (spec §3.3), accumulated in
float64 while streaming over column blocks, so no [n, d] float64 copy is ever made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from spmc.defenses.base import Aggregate, RoundInputs, as_weight_list, weighted_average

if TYPE_CHECKING:
    from spmc.config import Experiment

WeightFn = Literal["softmax", "sigmoid"]
ScoreRef = Literal["loo", "global"]
ScoreSpace = Literal["params", "updates"]
LooPrior = Literal["uniform", "samples"]

_BLOCK = 1 << 16


def loo_cosine_scores(
    vectors: torch.Tensor, prior: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """s_k = cos(a_k, b_k) with b_k the prior-weighted mean of all rows but k (spec §3.2-§3.3), float64 [n].

    ``vectors`` is [n, d]; ``prior`` defaults to uniform weights. n = 1 has no coalition and returns [0.0].
    A zero vector gives s = 0 through ε (spec §3.4).
    """
    if vectors.dim() != 2:
        raise ValueError(f"vectors must be [n, d]; got shape {tuple(vectors.shape)}")
    n = vectors.shape[0]
    w = torch.full((n,), 1.0 / n, dtype=torch.float64) if prior is None else prior.to(torch.float64).cpu()
    if w.shape != (n,) or bool((w < 0).any()):
        raise ValueError(f"prior must be {n} non-negative weights; got {w.tolist()}")
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    w_dev = w.to(vectors.device)
    g = torch.zeros(n, dtype=torch.float64, device=vectors.device)
    q = torch.zeros(n, dtype=torch.float64, device=vectors.device)
    big_q = torch.zeros((), dtype=torch.float64, device=vectors.device)
    for start in range(0, vectors.shape[1], _BLOCK):
        block = vectors[:, start : start + _BLOCK].to(torch.float64)
        s_block = w_dev @ block
        g += block @ s_block
        q += (block * block).sum(dim=1)
        big_q += s_block @ s_block
    g, q, big_q = g.cpu(), q.cpu(), big_q.cpu()
    rest = w.sum() - w
    if bool((rest <= 0).any()):
        raise ValueError("prior: every leave-one-out coalition needs positive total weight")
    dot = (g - w * q) / rest
    norm_b = ((big_q - 2 * w * g + w * w * q).clamp_min(0.0)).sqrt() / rest
    return dot / (q.sqrt() * norm_b + eps)


def reference_cosine_scores(vectors: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """s_k = ⟨a_k, r⟩ / (‖a_k‖·‖r‖ + ε) against one reference vector (``spmc_score_ref = global``, D4), float64."""
    a = vectors.to(torch.float64)
    r = reference.to(torch.float64)
    return ((a @ r) / (a.norm(dim=1) * r.norm() + eps)).cpu()


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


def marginal_teachers(
    global_state: torch.Tensor, client_states: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """teacher_k = (θ_g − α_k θ_k)/(1 − α_k), the α-weighted leave-one-out model of every client (spec §4.1).

    ``global_state`` must be Σ α_k θ_k. With one client there is no coalition and the teacher is the global
    model (spec §3.4); the same holds for any client whose weight is 1 (its coalition has weight 0), which a
    client-selecting defense can produce. The coefficients 1/(1 − α_k) and α_k/(1 − α_k) are formed in float64,
    the [n, d] result in the states' dtype.
    """
    if weights.shape != (client_states.shape[0],):
        raise ValueError(f"weights has shape {tuple(weights.shape)}; expected ({client_states.shape[0]},)")
    w = weights.to(torch.float64).to(client_states.device)
    alone = (1.0 - w) <= 1e-12
    scale = torch.where(alone, torch.zeros_like(w), 1.0 / (1.0 - w).clamp_min(1e-12))
    a = (w * scale).to(client_states.dtype).unsqueeze(1)
    teachers = global_state.unsqueeze(0) * scale.to(client_states.dtype).unsqueeze(1) - a * client_states
    teachers[alone] = global_state
    return teachers


class SPMC:
    """Margin-contribution aggregation; its weights also define the client-side teachers (spec §3, §4.1)."""

    name: ClassVar[str] = "spmc"
    description: ClassVar[str] = "SPMC: softmax of leave-one-out cosine scores, no attacker count (spec §3)"
    needs_server_data: ClassVar[bool] = False

    def __init__(
        self,
        temperature: float = 1.0,
        weight_fn: WeightFn = "softmax",
        score_ref: ScoreRef = "loo",
        score_space: ScoreSpace = "params",
        loo_prior: LooPrior = "uniform",
        score_eps: float = 1e-5,
    ) -> None:
        spmc_weights(torch.zeros(1), temperature, weight_fn)
        for field, value, allowed in (
            ("spmc_score_ref", score_ref, ("loo", "global")),
            ("spmc_score_space", score_space, ("params", "updates")),
            ("spmc_loo_prior", loo_prior, ("uniform", "samples")),
        ):
            if value not in allowed:
                raise ValueError(f"{field}: unknown value {value!r}; allowed: {', '.join(allowed)}")
        if score_ref == "global" and score_space == "updates":
            raise ValueError(
                "spmc_score_ref: 'global' compares client models with the global model and needs "
                "spmc_score_space = 'params' (the global model has no update of its own)"
            )
        if score_eps < 0:
            raise ValueError(f"spmc_score_eps: got {score_eps}; must be >= 0")
        self.temperature = temperature
        self.weight_fn = weight_fn
        self.score_ref = score_ref
        self.score_space = score_space
        self.loo_prior = loo_prior
        self.score_eps = score_eps

    @classmethod
    def from_config(cls, cfg: Experiment) -> SPMC:
        return cls(
            temperature=cfg.spmc_temperature,
            weight_fn=cfg.spmc_weight_fn,
            score_ref=cfg.spmc_score_ref,
            score_space=cfg.spmc_score_space,
            loo_prior=cfg.spmc_loo_prior,
            score_eps=cfg.spmc_score_eps,
        )

    def scores(self, inputs: RoundInputs) -> torch.Tensor:
        """s_k on vec_P of the states (or of the updates), against the LOO coalition or the global model (D4)."""
        mask = inputs.layout.param_mask(inputs.client_states.device)
        if inputs.layout.num_params == inputs.layout.dim:  # no buffers: skip the [n, d] masked copy
            vectors, reference = inputs.client_states, inputs.global_state
        else:
            vectors, reference = inputs.client_states[:, mask], inputs.global_state[mask]
        if self.score_space == "updates":
            vectors = vectors - reference
        if self.score_ref == "global":
            return reference_cosine_scores(vectors, reference, self.score_eps)
        prior = inputs.num_samples if self.loo_prior == "samples" else None
        return loo_cosine_scores(vectors, prior, self.score_eps)

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        if inputs.n == 1:
            w = torch.ones(1, dtype=torch.float64)
            s = torch.zeros(1, dtype=torch.float64)
        else:
            s = self.scores(inputs)
            w = spmc_weights(s, self.temperature, self.weight_fn)
        return Aggregate(
            global_state=weighted_average(inputs.client_states, w),
            weights=w,
            accepted=inputs.client_ids,
            diagnostics={
                "scores": as_weight_list(s, inputs.client_ids),
                "weights": as_weight_list(w, inputs.client_ids),
            },
        )
