"""DeepSight (Rieger, Nguyen, Miettinen, Sadeghi, "DeepSight: Mitigating Backdoor Attacks in Federated Learning
Through Deep Model Inspection", NDSS 2022; ATTACKS.md §A6).

With the output layer (W, b) of C classes, ΔW_k, Δb_k its update by client k, and p(·|x; θ) the softmax output:

    ε_{k,i}   = |Δb_{k,i}| + Σ_h |ΔW_{k,i,h}|                      (energy of output neuron i)
    NEUP_{k,i} = ε_{k,i}² / Σ_j ε_{k,j}²                           (normalised update energy)
    TE_k      = #{i : NEUP_{k,i} > ξ · max_j NEUP_{k,j}},  ξ = max(``deepsight_threshold`` (0.01), 1/C)
    suspicious_k  ⇔  TE_k ≤ median_j TE_j / 2                     (homogeneous, backdoor-like training data)
    DDif_{k,s,i} = (1/N) Σ_{x ∈ R_s} p(i|x; θ_k) / p(i|x; θ_g)     (R_s: N random inputs of seed s, s = 1 … 3)
    clusterings  HDBSCAN of: the cosine distances of the Δb_k; the NEUPs; the DDifs of each seed (Euclidean)
    ensemble  D_kl = mean over {mean over seeds of the DDif clusterings, NEUP, cosine} of [k, l in different
              clusters];  final clusters = HDBSCAN(D, precomputed)
    accept    a cluster whose share of suspicious clients is < τ = ``deepsight_tau`` (1/3), the rule of Alg. 1
    θ_g ← θ_g + mean over the accepted of u_k · min(1, S/‖u_k‖),  S = median ‖u_k‖ over all clients

Choices (the paper's Alg. 1 and the public re-implementations — FLPoison, BackFed — agree on the formulas above;
what they leave open is written down here):

* Output layer: the last 2-D parameter of the layout and, when the next entry is a parameter of shape [C], its bias
  (for SimpleCNN and the other built-in models, the final ``Linear``). Without a bias the energy is the weights'
  alone and the cosine clustering uses the flattened ΔW.
* The model comes from the server's scratch model (``needs_server_data``: the defense reads the model and the
  input shape of ``server_data``, not its images). The random inputs are uniform in [0, 1) in the shape of one
  server image, passed through the server's transform (the normalisation the model expects), drawn from a
  generator seeded by the experiment seed and the DDif seed index (the same inputs every round, as in the
  reference implementations). N = ``deepsight_samples`` (64 per seed; the paper's implementations use 20,000 —
  64 keeps a round of 100 SimpleCNN clients affordable on a CPU; raise it for fidelity). Models run in eval mode.
* HDBSCAN (scikit-learn): min_cluster_size = 2, min_samples = 1, allow_single_cluster = True in every clustering
  (a group of two colluding clients can form its own cluster; a single dense group is one cluster, not noise).
  Noise points are clusters of their own: a suspicious outlier is dropped, a benign one kept.
* Ratios use log-probabilities (p_k/p_g = exp(ln p_k − ln p_g), exponent clamped at ±700) so no input overflows.
* No cluster accepted: the global state stays as it is (weights None).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from spmc.defenses.base import Aggregate, RoundInputs, as_weight_list, finite_global, stat_mask
from spmc.defenses.flame import clipped_mean_state, cosine_distances, hdbscan_labels, log_norms, median_clip_factors
from spmc.defenses.krum import pairwise_sq_distances
from spmc.defenses.server_data import ServerData
from spmc.options import option
from spmc.params import Entry, ParamLayout
from spmc.threat import ThreatModel

log = logging.getLogger(__name__)


def output_layer(layout: ParamLayout) -> tuple[Entry, Entry | None]:
    """(weight, bias or None) of the output layer: the last 2-D parameter and the [C] parameter right after it."""
    params = layout.params
    for i in range(len(params) - 1, -1, -1):
        if len(params[i].shape) == 2:
            weight = params[i]
            nxt = params[i + 1] if i + 1 < len(params) else None
            bias = nxt if nxt is not None and nxt.shape == (weight.shape[0],) else None
            return weight, bias
    raise ValueError("deepsight: the model has no 2-D parameter (no output layer to inspect)")


def neups(weight_updates: torch.Tensor, bias_updates: torch.Tensor | None) -> torch.Tensor:
    """NEUP_{k,i} = ε²_{k,i} / Σ_j ε²_{k,j} for weight updates [n, C, h] and bias updates [n, C]; float64 [n, C].
    A client with no energy gets the uniform 1/C. Scale-free, so each client's updates are first divided by their
    largest entry (no overflow)."""
    w = weight_updates.to(torch.float64).flatten(2)
    n, c = w.shape[0], w.shape[1]
    parts = [w.abs().flatten(1)] + ([bias_updates.to(torch.float64).abs()] if bias_updates is not None else [])
    top = torch.cat(parts, dim=1).amax(dim=1) if n else torch.zeros(0, dtype=torch.float64)
    top = torch.where(top > 0, top, torch.ones_like(top))
    energy = (w.abs() / top[:, None, None]).sum(dim=2)
    if bias_updates is not None:
        energy = energy + bias_updates.to(torch.float64).abs() / top[:, None]
    sq = energy**2
    total = sq.sum(dim=1, keepdim=True)
    return torch.where(
        total > 0, sq / torch.where(total > 0, total, torch.ones_like(total)), torch.full_like(sq, 1 / c)
    )


def threshold_exceedings(neup: torch.Tensor, factor: float = 0.01) -> torch.Tensor:
    """TE_k = #{i : NEUP_{k,i} > max(factor, 1/C) · max_j NEUP_{k,j}}, int64 [n]."""
    xi = max(factor, 1.0 / neup.shape[1])
    return (neup > xi * neup.amax(dim=1, keepdim=True)).sum(dim=1)


def suspicious_labels(te: torch.Tensor) -> list[bool]:
    """Suspicious ⇔ TE_k ≤ median(TE)/2 (the median of an even count: the mean of the two middle values)."""
    values = sorted(float(v) for v in te.tolist())
    n = len(values)
    med = values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
    return [float(v) <= med / 2 for v in te.tolist()]


@torch.no_grad()
def ddifs(
    server: ServerData, states: torch.Tensor, global_state: torch.Tensor, seeds: int, samples: int, seed: int
) -> torch.Tensor:
    """DDif_{k,s,i} = mean over N random inputs of p(i|x; θ_k)/p(i|x; θ_g), float64 [seeds, n, C]."""
    model = server.model
    model.eval()
    shape = tuple(server.x.shape[1:])
    out = []
    for s in range(seeds):
        gen = torch.Generator().manual_seed((seed * 1_000_003 + 7919 * (s + 1)) % (2**63))
        x = server.transform(torch.rand((samples, *shape), generator=gen).to(server.x.device), gen)

        def log_probs(state: torch.Tensor, inputs: torch.Tensor = x) -> torch.Tensor:
            server.layout.load(model, state)
            logits = torch.nan_to_num(model(inputs).to(torch.float64), nan=0.0, posinf=1e300, neginf=-1e300)
            return F.log_softmax(logits, dim=1)

        ref = log_probs(global_state)
        out.append(torch.stack([(log_probs(st) - ref).clamp(-700.0, 700.0).exp().mean(dim=0) for st in states]))
    return torch.stack(out).cpu()


def cocluster_distances(labels: Sequence[int]) -> torch.Tensor:
    """[n, n] float64: 0 where two points share a cluster, 1 elsewhere; each noise point is its own cluster."""
    n = len(labels)
    ids = torch.tensor([label if label >= 0 else -1 - i for i, label in enumerate(labels)])
    return (ids[:, None] != ids[None, :]).to(torch.float64) if n else torch.zeros(0, 0, dtype=torch.float64)


def euclidean(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows, float64 [n, n], after dividing by the largest entry (no overflow)."""
    v = x.to(torch.float64)
    top = float(v.abs().max()) if v.numel() else 0.0
    return pairwise_sq_distances(v / top if top > 0 else v).sqrt()


def clusters_of(labels: Sequence[int]) -> list[list[int]]:
    """Positions grouped by cluster; each noise point alone."""
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label if label >= 0 else -1 - i, []).append(i)
    return [sorted(g) for g in groups.values()]


@dataclass(frozen=True)
class DeepSightOptions:
    """DeepSight's options (``deepsight_*``)."""

    tau: float = option(
        1 / 3, "deepsight_tau", "a cluster is accepted if its share of suspicious clients is < τ (NDSS'22)"
    )
    threshold: float = option(
        0.01, "deepsight_threshold", "threshold factor ξ > 0 of the NEUP exceedings, max(ξ, 1/C) (NDSS'22)"
    )
    seeds: int = option(3, "deepsight_seeds", "number of random input sets (DDif seeds), >= 1 (NDSS'22: 3)")
    samples: int = option(64, "deepsight_samples", "random inputs per DDif seed, >= 1 (NDSS'22 implementations: 20000)")
    exclude_int_buffers: bool = option(
        True,
        "exclude_int_buffers",
        "leave integer counters (BN's num_batches_tracked) out of vector statistics (spec D31)",
    )

    def __post_init__(self) -> None:
        if not (isinstance(self.tau, (int, float)) and 0.0 < self.tau <= 1.0):
            raise ValueError(f"deepsight_tau: got {self.tau!r}; must be a fraction in (0, 1]")
        if not (isinstance(self.threshold, (int, float)) and 0.0 <= self.threshold <= 1.0):
            raise ValueError(f"deepsight_threshold: got {self.threshold!r}; must be in [0, 1]")
        for key, value in (("deepsight_seeds", self.seeds), ("deepsight_samples", self.samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: got {value!r}; must be an integer >= 1")


class DeepSight:
    """NEUPs, threshold exceedings, DDifs and ensemble HDBSCAN; clusters with few suspicious models are averaged
    after clipping to the median norm."""

    name: ClassVar[str] = "deepsight"
    description: ClassVar[str] = "DeepSight: NEUP/DDif ensemble clustering, drops suspicious clusters (NDSS'22)"
    needs_server_data: ClassVar[bool] = True
    options_type: ClassVar[type[DeepSightOptions]] = DeepSightOptions

    def __init__(self, options: DeepSightOptions | None = None, threat: ThreatModel | None = None) -> None:
        self.options = options if options is not None else DeepSightOptions()
        self.seed = (threat if threat is not None else ThreatModel()).seed

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        server = inputs.server_data
        if server is None:
            raise ValueError("deepsight: needs the server's model (server_data) to compute DDifs; none was given")
        ids, n = inputs.client_ids, inputs.n
        layout = inputs.layout
        mask = stat_mask(layout, self.options.exclude_int_buffers, inputs.client_states.device)
        all_updates = inputs.updates
        weight, bias = output_layer(layout)
        dw = all_updates[:, weight.slice].reshape(n, *weight.shape)
        db = all_updates[:, bias.slice] if bias is not None else None
        neup = neups(dw, db)
        te = threshold_exceedings(neup, self.options.threshold)
        suspicious = suspicious_labels(te)
        dd = ddifs(
            server, inputs.client_states, inputs.global_state, self.options.seeds, self.options.samples, self.seed
        )

        bias_like = db if db is not None else dw.flatten(1)
        cos_d = cocluster_distances(hdbscan_labels(cosine_distances(bias_like), 2))
        neup_d = cocluster_distances(hdbscan_labels(euclidean(neup), 2))
        ddif_d = torch.stack([cocluster_distances(hdbscan_labels(euclidean(d), 2)) for d in dd]).mean(dim=0)
        merged = (ddif_d + neup_d + cos_d) / 3
        labels = hdbscan_labels(merged, 2)

        kept: list[int] = []
        for group in clusters_of(labels):
            bad = sum(suspicious[i] for i in group)
            if bad < self.options.tau * len(group):
                kept.extend(group)
        kept.sort()
        updates = all_updates[:, mask]
        factors, log_s = median_clip_factors(log_norms(updates))
        new, w = clipped_mean_state(inputs, updates, kept, factors, mask)
        if not kept:
            log.info("deepsight: no cluster accepted in round %d; the global state is unchanged", inputs.round)
        return Aggregate(
            global_state=finite_global(new, self.name),
            weights=w if kept else None,
            accepted=tuple(ids[i] for i in kept),
            diagnostics={
                "weights": as_weight_list(w, ids),
                "threshold_exceedings": {str(k): int(v) for k, v in zip(ids, te.tolist())},
                "suspicious": sorted(k for k, flag in zip(ids, suspicious) if flag),
                "labels": {str(k): label for k, label in zip(ids, labels)},
                "median_norm": math.exp(log_s) if log_s < 709.0 else math.inf,
                "removed": sorted(ids[i] for i in range(n) if i not in set(kept)),
            },
        )
