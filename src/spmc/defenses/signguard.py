"""SignGuard (Xu, Huang, Song, Lan, "SignGuard: Byzantine-robust Federated Learning through Collaborative Malicious
Gradient Filtering", ICDCS 2022, Alg. 1; ATTACKS.md §A6).

On the updates u_k = θ_k − θ_g restricted to the float entries (integer counters left out, spec D31), with
med = the median of ‖u_k‖ over the round's clients:

    S1 = {k : lower · med ≤ ‖u_k‖ ≤ upper · med}                  lower = ``signguard_lower`` (0.1),
                                                                 upper = ``signguard_upper`` (3.0)
    J  = a random subset of ⌈frac · D⌉ of the D float coordinates  frac = ``signguard_coord_frac`` (0.1)
    s_k = (share of u_k[J] > 0, share = 0, share < 0), each column divided by its maximum over the clients (+1e−8)
    S2 = the largest MeanShift cluster of {s_k}                  (bandwidth: sklearn's ``estimate_bandwidth`` at
                                                                 quantile 0.5 on ≤ 50 samples, bin seeding,
                                                                 ``cluster_all = False``)
    c_k = min(1, med / ‖u_k‖)
    θ_g ← θ_g + (1/|S|) Σ_{k ∈ S} c_k u_k,   S = S1 ∩ S2          (float entries; integer counters: mean over S)

Choices where the paper is loose, following the authors' code (JianXu95/SignGuard, ``signguard_multiclass``): the
column normalisation by the maximum, the MeanShift settings and the clipping to the median norm of *all* clients.
Where this departs from that code: the band is inclusive (the spec's 0.1 ≤ ratio ≤ 3.0; the code uses strict
inequalities); J is a random subset of coordinates drawn from ``round_generator(seed, round)`` (the code takes a
random contiguous block from the global RNG); the median is the usual one (the code's clip bound is torch's lower
median). The features are clustered in the order of the client ids, so that sklearn's subsampling in
``estimate_bandwidth`` and its cluster numbering (ties between equally large clusters go to the lower label) never
depend on the order in which the clients are given. When the bandwidth is 0 (all sign features equal, or fewer than
three clients) or MeanShift finds no cluster, S2 is every client. When S is empty the global state is left unchanged.
The mean is uniform over S.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from spmc.defenses.base import Aggregate, RoundInputs, as_weight_list, finite_global, round_generator, stat_mask
from spmc.defenses.norm_clip import clip_diagnostics, clipped_mean_state, median, power_of_two_scale, scaled_row_norms
from spmc.options import option
from spmc.threat import ThreatModel


def norm_band(norms: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """Clients with lower · med ≤ ‖u_k‖ ≤ upper · med (med = the median of ``norms``), a bool mask [n]."""
    med = median(norms)
    n = norms.to(torch.float64)
    return (n >= lower * med) & (n <= upper * med)


def sign_features(values: torch.Tensor) -> torch.Tensor:
    """(share > 0, share = 0, share < 0) of each row of ``values`` [n, j], each column divided by its maximum over
    the rows (+1e−8, as the authors' code); float64 [n, 3] on the CPU."""
    signs = torch.sign(values)
    count = max(values.shape[1], 1)
    shares = torch.stack([(signs > 0).sum(dim=1), (signs == 0).sum(dim=1), (signs < 0).sum(dim=1)], dim=1).to(
        torch.float64
    )
    shares = shares.cpu() / count
    return shares / (shares.max(dim=0).values + 1e-8)


def largest_meanshift_cluster(features: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The rows of ``features`` [n, f] in the largest MeanShift cluster (ties: sklearn's lower label), a bool mask
    [n], and the bandwidth; every row when the bandwidth is 0 or no cluster is found. Give the rows in a fixed
    order (client ids): sklearn's bandwidth estimate subsamples them."""
    from sklearn.cluster import MeanShift, estimate_bandwidth  # imported here: scikit-learn takes seconds to load

    n = features.shape[0]
    x = features.to(torch.float64).numpy()
    bandwidth = float(estimate_bandwidth(x, quantile=0.5, n_samples=50)) if n >= 2 else 0.0
    if not math.isfinite(bandwidth) or bandwidth <= 0.0:
        return torch.ones(n, dtype=torch.bool), bandwidth
    try:
        labels = np.asarray(MeanShift(bandwidth=bandwidth, bin_seeding=True, cluster_all=False).fit(x).labels_)
    except ValueError:  # no point within the bandwidth of a seed
        return torch.ones(n, dtype=torch.bool), bandwidth
    kept = labels[labels >= 0]
    if kept.size == 0:
        return torch.ones(n, dtype=torch.bool), bandwidth
    best = int(np.argmax(np.bincount(kept)))
    return torch.from_numpy(labels == best), bandwidth


def coordinate_subset(dim: int, frac: float, generator: torch.Generator) -> torch.Tensor:
    """⌈frac · dim⌉ (at least 1) distinct coordinates of ``range(dim)`` drawn from ``generator``, sorted."""
    count = min(dim, max(1, math.ceil(frac * dim - 1e-9)))
    return torch.randperm(dim, generator=generator)[:count].sort().values


@dataclass(frozen=True)
class SignGuardOptions:
    """SignGuard's options: the norm band, the share of coordinates for the sign statistics, integer counters."""

    lower: float = option(
        0.1, "signguard_lower", "signguard: keep ‖u_k‖ ≥ lower · median norm (>= 0; Xu et al. ICDCS 2022: 0.1)"
    )
    upper: float = option(
        3.0, "signguard_upper", "signguard: keep ‖u_k‖ ≤ upper · median norm (>= lower; Xu et al. ICDCS 2022: 3.0)"
    )
    coord_frac: float = option(
        0.1,
        "signguard_coord_frac",
        "signguard: share of the coordinates drawn each round for the sign statistics (0 < frac <= 1; "
        "Xu et al. ICDCS 2022: 0.1)",
    )
    exclude_int_buffers: bool = option(
        True,
        "exclude_int_buffers",
        "leave integer counters (BN's num_batches_tracked) out of vector statistics (spec D31)",
    )

    def __post_init__(self) -> None:
        if not (isinstance(self.lower, (int, float)) and math.isfinite(self.lower) and self.lower >= 0):
            raise ValueError(f"signguard_lower: got {self.lower!r}; must be a finite number >= 0")
        if not (isinstance(self.upper, (int, float)) and math.isfinite(self.upper) and self.upper >= self.lower):
            raise ValueError(
                f"signguard_upper: got {self.upper!r}; must be a finite number >= signguard_lower = {self.lower}"
            )
        if not (isinstance(self.coord_frac, (int, float)) and 0 < self.coord_frac <= 1):
            raise ValueError(f"signguard_coord_frac: got {self.coord_frac!r}; must be in (0, 1]")


def sorted_positions(client_ids: Sequence[int]) -> list[int]:
    """The positions of ``client_ids`` in increasing id order."""
    return sorted(range(len(client_ids)), key=lambda i: client_ids[i])


class SignGuard:
    """Norm band ∩ largest sign-statistics cluster, clipped to the median norm, uniform mean."""

    name: ClassVar[str] = "signguard"
    description: ClassVar[str] = "SignGuard: norm band ∩ largest MeanShift cluster of sign statistics, clipped mean"
    needs_server_data: ClassVar[bool] = False
    options_type: ClassVar[type[SignGuardOptions]] = SignGuardOptions

    def __init__(self, options: SignGuardOptions | None = None, threat: ThreatModel | None = None) -> None:
        self.options = options if options is not None else SignGuardOptions()
        self.seed = (threat if threat is not None else ThreatModel()).seed

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        opts = self.options
        ids = inputs.client_ids
        mask = stat_mask(inputs.layout, opts.exclude_int_buffers, inputs.client_states.device)
        updates = inputs.updates[:, mask]
        norms = scaled_row_norms(updates, power_of_two_scale(updates))
        band = norm_band(norms, opts.lower, opts.upper)
        order = sorted_positions(ids)
        coords = coordinate_subset(updates.shape[1], opts.coord_frac, round_generator(self.seed, inputs.round))
        features = sign_features(updates[:, coords.to(updates.device)][torch.tensor(order, device=updates.device)])
        in_cluster_sorted, bandwidth = largest_meanshift_cluster(features)
        in_cluster = torch.zeros(inputs.n, dtype=torch.bool)
        in_cluster[torch.tensor(order, dtype=torch.long)] = in_cluster_sorted
        keep = band & in_cluster
        accepted = tuple(cid for cid, k in zip(ids, keep.tolist()) if k)
        diagnostics: dict[str, object] = {
            "norm_band_removed": sorted(cid for cid, b in zip(ids, band.tolist()) if not b),
            "sign_cluster_removed": sorted(cid for cid, c in zip(ids, in_cluster.tolist()) if not c),
            "bandwidth": bandwidth,
            "removed": sorted(cid for cid in ids if cid not in accepted),
        }
        if not accepted:
            w = torch.zeros(inputs.n, dtype=torch.float64)
            return Aggregate(
                global_state=inputs.global_state.clone(),
                weights=w,
                accepted=(),
                diagnostics=diagnostics | {"weights": as_weight_list(w, ids), "empty": True},
            )
        w = keep.to(torch.float64) / len(accepted)
        new, factors, bound = clipped_mean_state(inputs, w, None, opts.exclude_int_buffers)
        return Aggregate(
            global_state=finite_global(new, self.name),
            weights=w,
            accepted=accepted,
            diagnostics=diagnostics | {"weights": as_weight_list(w, ids)} | clip_diagnostics(factors, bound, ids),
        )
