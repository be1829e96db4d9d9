"""FoolsGold: down-weight clients whose update histories are too similar (Fung et al., RAID'20; spec §6.8, D24).

On the trainable parameters, with Δ_k = vec_P(θ_k) − vec_P(θ_g), the reference code's ``fools_gold_weight``:

    1. û_k = Δ_k / (‖Δ_k‖ + ε)                                   ε = ``foolsgold_norm_eps`` (0.1)
    2. H_k ← H_k + û_k                 history kept per client id across rounds; a new client starts at û_k
    3. cs = cos(H_i, H_j) − I ;  v_i = max_j cs_ij + 1e−5
    4. pardoning: for j ≠ i, if v_i < v_j then cs_ij ← cs_ij · v_i / v_j
    5. w_i = clip(1 − max_j cs_ij, 0, 1) ;  w ← w / max w ;  w_i = 1 → 0.99
    6. w_i ← κ · (ln(w_i / (1 − w_i) + 1e−5) + 0.5) ;  → 1 where infinite or > 1, → 0 where < 0
    7. α = w / Σ w  (uniform if Σ w = 0 or any w is NaN)

``foolsgold_normalize_weights = True`` (the repo): θ_g ← Σ_k α_k θ_k over the whole state. ``False`` (the
original): vec_P(θ_g) ← vec_P(θ_g) + Σ_k w_k Δ_k with the unnormalised w, buffers ← Σ_k α_k (buffers of θ_k).
κ multiplies the logit as in the original paper (κ = 1 is the repo's formula).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from spmc.defenses._options import check_bool, check_real
from spmc.defenses.base import Aggregate, RoundInputs, as_weight_list, finite_global, weighted_average
from spmc.defenses.linalg import gram
from spmc.options import option

log = logging.getLogger(__name__)


def normalized_updates(updates: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """û_k = Δ_k / (‖Δ_k‖ + ε), norms accumulated in float64, returned in the updates' dtype [n, m]."""
    norms: torch.Tensor = torch.linalg.vector_norm(updates, dim=1, dtype=torch.float64) + eps
    return updates / norms.to(updates.dtype).unsqueeze(1)


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of the rows, float64 [n, n]; a zero row has cosine 0 with everything (sklearn)."""
    g = gram(vectors)
    norms = g.diagonal().clamp_min(0.0).sqrt()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    cos = g / safe.unsqueeze(1) / safe.unsqueeze(0)
    zero = norms == 0
    cos[zero, :] = 0.0
    cos[:, zero] = 0.0
    return cos.cpu()


def foolsgold_weights(histories: torch.Tensor, kappa: float = 1.0) -> torch.Tensor:
    """Steps 3-6: the logit weights w from the histories [n, m], float64 [n]; NaN where max w = 0 (see step 7)."""
    n = histories.shape[0]
    cs = cosine_matrix(histories) - torch.eye(n, dtype=torch.float64)
    v = cs.max(dim=1).values + 1e-5
    pardon = (v.unsqueeze(1) < v.unsqueeze(0)) & ~torch.eye(n, dtype=torch.bool)
    cs = torch.where(pardon, cs * v.unsqueeze(1) / v.unsqueeze(0), cs)
    w = (1.0 - cs.max(dim=1).values).clamp(0.0, 1.0)
    w = w / w.max()
    w[w == 1] = 0.99
    w = kappa * (torch.log(w / (1 - w) + 1e-5) + 0.5)
    w[torch.isinf(w) | (w > 1)] = 1.0
    w[w < 0] = 0.0
    return w


def normalize_or_uniform(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """α = w / Σ w, or uniform weights (and True) when Σ w = 0 or any entry is NaN (step 7)."""
    n = w.shape[0]
    if bool(torch.isnan(w).any()) or float(w.sum()) <= 0:
        return torch.full((n,), 1.0 / n, dtype=torch.float64), True
    return w / w.sum(), False


@dataclass(frozen=True)
class FoolsGoldOptions:
    """FoolsGold's options (``foolsgold_*``)."""

    norm_eps: float = option(
        0.1, key="foolsgold_norm_eps", help="ε in û_k = Δ_k / (‖Δ_k‖ + ε); >= 0 (ALGORITHMS.md §6.8)"
    )
    kappa: float = option(
        1.0,
        key="foolsgold_kappa",
        help="confidence κ scaling the logit weights κ·(ln(w / (1 − w)) + 0.5); > 0 (ALGORITHMS.md §6.8)",
    )
    normalize_weights: bool = option(
        True,
        key="foolsgold_normalize_weights",
        help="weights normalised to sum 1 and models averaged (repo) or Σ w_k Δ_k added (original) "
        "(ALGORITHMS.md §6.8, D24)",
    )

    def __post_init__(self) -> None:
        check_real("foolsgold_norm_eps", self.norm_eps, ge=0.0)
        check_real("foolsgold_kappa", self.kappa, gt=0.0)
        check_bool("foolsgold_normalize_weights", self.normalize_weights)


class FoolsGold:
    """Similarity-of-history weighting; the per-client histories live on this object, keyed by client id."""

    name: ClassVar[str] = "foolsgold"
    description: ClassVar[str] = "FoolsGold: down-weights clients with similar update histories (spec §6.8)"
    needs_server_data: ClassVar[bool] = False
    options_type: ClassVar[type[FoolsGoldOptions]] = FoolsGoldOptions

    def __init__(self, options: FoolsGoldOptions | None = None) -> None:
        self.options = options if options is not None else FoolsGoldOptions()
        self.history: dict[int, torch.Tensor] = {}

    def state_dict(self) -> dict[int, torch.Tensor]:
        """The update histories H_k, ``{client id: float32 tensor on the CPU}``, for checkpoints."""
        return {k: h.detach().cpu().clone() for k, h in sorted(self.history.items())}

    def load_state_dict(self, state: Mapping[int | str, torch.Tensor]) -> None:
        """Restore the histories written by :meth:`state_dict` (string ids from JSON-like stores are accepted)."""
        history: dict[int, torch.Tensor] = {}
        for k, h in state.items():
            if not isinstance(h, torch.Tensor) or h.dim() != 1:
                raise ValueError(f"foolsgold history of client {k}: expected a 1-D tensor, got {h!r:.80}")
            history[int(k)] = h.detach().clone()
        self.history = history

    def _update_history(self, ids: tuple[int, ...], unit: torch.Tensor) -> torch.Tensor:
        for cid in ids:
            prev = self.history.get(cid)
            if prev is not None and prev.shape != unit.shape[1:]:
                raise ValueError(
                    f"foolsgold history of client {cid} has {prev.shape[0]} entries; the model has {unit.shape[1]} "
                    "parameters (a history from another model?)"
                )
        rows = []
        for cid, u in zip(ids, unit):
            prev = self.history.get(cid)
            h = u.clone() if prev is None else prev.to(u.device) + u
            self.history[cid] = h
            rows.append(h)
        return torch.stack(rows)

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        mask = inputs.layout.param_mask(inputs.client_states.device)
        g = inputs.global_state[mask]
        updates = inputs.client_states[:, mask] - g
        histories = self._update_history(inputs.client_ids, normalized_updates(updates, self.options.norm_eps))
        w = foolsgold_weights(histories, self.options.kappa)
        alpha, fallback = normalize_or_uniform(w)
        if fallback:
            log.info("foolsgold: weights undefined or all zero in round %d; uniform weights", inputs.round)
            w = alpha
        new = weighted_average(inputs.client_states, alpha.to(inputs.client_states.device))
        if not self.options.normalize_weights:
            step = w.to(updates.device) @ updates.to(torch.float64)
            new[mask] = (g.to(torch.float64) + step).to(new.dtype)
        accepted = tuple(cid for cid, a in zip(inputs.client_ids, alpha.tolist()) if a > 0)
        return Aggregate(
            global_state=finite_global(new, self.name),
            weights=alpha,
            accepted=accepted,
            diagnostics={
                "weights": as_weight_list(alpha, inputs.client_ids),
                "logit_weights": as_weight_list(w, inputs.client_ids),
                "removed": [cid for cid in inputs.client_ids if cid not in accepted],
                "uniform_fallback": fallback,
            },
        )
