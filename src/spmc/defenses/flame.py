"""FLAME (Nguyen et al., "FLAME: Taming Backdoors in Federated Learning", USENIX Security 2022; ATTACKS.md §A6).

On the updates u_k = θ_k − θ_g restricted to the float entries (integer counters left out, spec D31):

    D_ij = 1 − cos(u_i, u_j)                                        (cosine distances)
    labels = HDBSCAN(min_cluster_size = ⌊n/2⌋ + 1, min_samples = 1, metric = precomputed,
                     allow_single_cluster = True).fit(D)
    kept = the largest cluster (HDBSCAN's noise points are rejected)
    S    = median_k ‖u_k‖ over ALL n updates                         (average of the two middle norms for even n)
    ū    = (1/|kept|) Σ_{k ∈ kept} u_k · min(1, S/‖u_k‖)
    θ_g ← θ_g + ū + N(0, (λS)² I) on the trainable parameters,      λ = ``flame_lambda`` (0.001)

Choices where the paper leaves room (written down as the issue asks):

* ``allow_single_cluster = True`` as in the authors' description and the public re-implementations: with
  min_cluster_size > n/2 at most one cluster exists, and without it HDBSCAN calls a single dense group noise. If
  HDBSCAN still labels every client noise (all updates equally far apart), every client is kept and the
  diagnostics say so (``all_noise``). With a single client there is nothing to cluster: it is kept.
* The noise goes on the trainable parameters only (not on BatchNorm statistics, not on counters); it is drawn from a
  generator seeded by the experiment seed and the round (:func:`spmc.defenses.base.round_generator`), so it never
  depends on the global RNG or on the client order. Integer counters become the plain mean of the kept clients'.
* Norms and cosines are computed without overflow for any finite input (rows scaled by their largest entry).

:func:`cosine_distances`, :func:`log_norms`, :func:`median_clip_factors`, :func:`hdbscan_labels` and
:func:`clipped_mean_state` are shared with DeepSight.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from spmc.defenses.base import (
    Aggregate,
    RoundInputs,
    as_weight_list,
    finite_global,
    round_generator,
    stat_mask,
    weighted_average,
)
from spmc.defenses.linalg import gram, row_sq_norms
from spmc.options import option
from spmc.threat import ThreatModel

log = logging.getLogger(__name__)


def row_scaled(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_k / m_k, m_k) with m_k = max |x_k| (1 for a zero row), float64: every scaled entry lies in [−1, 1]."""
    v = vectors.to(torch.float64)
    scale = v.abs().amax(dim=1) if v.shape[1] else torch.zeros(v.shape[0], dtype=torch.float64)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return v / scale.unsqueeze(1), scale


def cosine_distances(vectors: torch.Tensor) -> torch.Tensor:
    """D_ij = 1 − cos(x_i, x_j) of the rows of ``vectors`` [n, d], float64 [n, n] on the CPU, in [0, 2], symmetric,
    zero diagonal; a zero row is at distance 1 from every other row (cosine 0). Finite for any finite input."""
    scaled, _ = row_scaled(vectors)
    g = gram(scaled).cpu()
    norms = g.diagonal().clamp_min(0.0).sqrt()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    cos = (g / safe.unsqueeze(1) / safe.unsqueeze(0)).clamp(-1.0, 1.0)
    dist = 1.0 - cos
    dist = ((dist + dist.T) / 2).clamp(0.0, 2.0)
    dist.fill_diagonal_(0.0)
    return dist


def log_norms(vectors: torch.Tensor) -> torch.Tensor:
    """ln ‖x_k‖ of every row, float64 [n] (−inf for a zero row); no overflow for any finite input."""
    scaled, scale = row_scaled(vectors)
    sq = row_sq_norms(scaled).cpu()
    out = scale.cpu().log() + 0.5 * sq.log()
    return torch.where(sq > 0, out, torch.full_like(out, -math.inf))


def median_log(logs: torch.Tensor) -> float:
    """ln of the median of exp(``logs``): the middle value, or the mean of the two middle values for even n."""
    values = sorted(logs.tolist())
    n = len(values)
    if n == 0:
        raise ValueError("median of no norms")
    if n % 2:
        return float(values[n // 2])
    a, b = values[n // 2 - 1], values[n // 2]
    if b == -math.inf:
        return -math.inf
    if a == -math.inf:
        return float(b - math.log(2.0))
    return float(b + math.log1p(math.exp(a - b)) - math.log(2.0))


def median_clip_factors(logs: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(c_k = min(1, S/‖u_k‖) float64 [n], ln S) for S the median of the norms exp(``logs``)."""
    log_s = median_log(logs)
    ratio = (log_s - logs).clamp(max=0.0)
    factors = torch.where(torch.isnan(ratio), torch.zeros_like(ratio), ratio).exp()  # −inf − (−inf): both zero
    return torch.where(logs == -math.inf, torch.ones_like(factors), factors), log_s


def hdbscan_labels(
    dist: torch.Tensor, min_cluster_size: int, min_samples: int = 1, allow_single_cluster: bool = True
) -> list[int]:
    """scikit-learn's HDBSCAN labels (−1 = noise) for a precomputed [n, n] distance matrix. Fewer than two points,
    or a min_cluster_size above n: every point is noise."""
    n = dist.shape[0]
    if n < 2 or min_cluster_size > n:
        return [-1] * n
    from sklearn.cluster import HDBSCAN  # imported here: scikit-learn takes seconds to load

    clusterer = HDBSCAN(
        min_cluster_size=max(2, min_cluster_size),
        min_samples=min_samples,
        metric="precomputed",
        allow_single_cluster=allow_single_cluster,
        copy=True,
    )
    labels = clusterer.fit_predict(np.ascontiguousarray(dist.numpy(), dtype=np.float64))
    return [int(v) for v in labels]


def largest_cluster(labels: Sequence[int], client_ids: Sequence[int]) -> list[int]:
    """Positions of the largest non-noise cluster (ties: the cluster holding the smallest client id); all
    positions when every label is noise."""
    clusters: dict[int, list[int]] = {}
    for pos, label in enumerate(labels):
        if label >= 0:
            clusters.setdefault(label, []).append(pos)
    if not clusters:
        return list(range(len(labels)))
    best = min(clusters.values(), key=lambda members: (-len(members), min(client_ids[i] for i in members)))
    return sorted(best)


def clipped_mean_state(
    inputs: RoundInputs, updates: torch.Tensor, kept: Sequence[int], factors: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(new state, weights): on the entries of ``mask``, θ_g + (1/|kept|) Σ_{k ∈ kept} c_k u_k (``updates`` = the
    [n, |mask|] updates on those entries); elsewhere (integer counters) the plain mean of the kept states.
    ``weights`` [n] are 1/|kept| on the kept clients."""
    n = inputs.n
    w = torch.zeros(n, dtype=torch.float64)
    if not kept:
        return inputs.global_state.clone(), w
    w[list(kept)] = 1.0 / len(kept)
    states = inputs.client_states
    new = weighted_average(states, w.to(states.device))
    coef = (w * factors.to(torch.float64)).to(states.device)
    step = weighted_average(updates, coef)
    new[mask] = (inputs.global_state[mask].to(torch.float64) + step.to(torch.float64)).to(new.dtype)
    return new, w


@dataclass(frozen=True)
class FlameOptions:
    """FLAME's options (``flame_*``); the noise seed comes from the threat model."""

    lam: float = option(
        0.001,
        "flame_lambda",
        "noise level λ >= 0: std λ·S per parameter, S the median norm (Nguyen et al. USENIX Security 2022, §4)",
    )
    exclude_int_buffers: bool = option(
        True,
        "exclude_int_buffers",
        "leave integer counters (BN's num_batches_tracked) out of vector statistics (spec D31)",
    )

    def __post_init__(self) -> None:
        if not (isinstance(self.lam, (int, float)) and 0.0 <= self.lam < math.inf):
            raise ValueError(f"flame_lambda: got {self.lam!r}; must be a finite number >= 0")


class Flame:
    """Cosine HDBSCAN → keep the majority cluster → clip to the median norm → mean → Gaussian noise."""

    name: ClassVar[str] = "flame"
    description: ClassVar[str] = "FLAME: HDBSCAN on cosine distances, median-norm clipping, noise (USENIX Sec'22)"
    needs_server_data: ClassVar[bool] = False
    options_type: ClassVar[type[FlameOptions]] = FlameOptions

    def __init__(self, options: FlameOptions | None = None, threat: ThreatModel | None = None) -> None:
        self.options = options if options is not None else FlameOptions()
        self.seed = (threat if threat is not None else ThreatModel()).seed

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        ids = inputs.client_ids
        mask = stat_mask(inputs.layout, self.options.exclude_int_buffers, inputs.client_states.device)
        updates = inputs.updates[:, mask]
        labels = hdbscan_labels(cosine_distances(updates), inputs.n // 2 + 1, min_samples=1)
        all_noise = inputs.n > 1 and all(label < 0 for label in labels)
        if all_noise:
            log.info("flame: HDBSCAN labelled every client noise in round %d; keeping all", inputs.round)
        kept = largest_cluster(labels, ids)
        logs = log_norms(updates)
        factors, log_s = median_clip_factors(logs)
        new, w = clipped_mean_state(inputs, updates, kept, factors, mask)
        s = math.exp(log_s) if log_s < 709.0 else math.inf
        sigma = self.options.lam * s
        if sigma > 0:
            pmask = inputs.layout.param_mask(new.device)
            gen = round_generator(self.seed, inputs.round)
            noise = torch.randn(int(pmask.sum()), generator=gen, dtype=torch.float64) * sigma
            new[pmask] = (new[pmask].to(torch.float64) + noise.to(new.device)).to(new.dtype)
        return Aggregate(
            global_state=finite_global(new, self.name),
            weights=w,
            accepted=tuple(ids[i] for i in kept),
            diagnostics={
                "weights": as_weight_list(w, ids),
                "labels": {str(k): label for k, label in zip(ids, labels)},
                "clip_factors": as_weight_list(factors, ids),
                "median_norm": s,
                "noise_std": sigma,
                "all_noise": all_noise,
                "removed": sorted(ids[i] for i in range(inputs.n) if i not in set(kept)),
            },
        )
