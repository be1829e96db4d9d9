"""DnC, Divide-and-Conquer (spec §6.2 [REC], D18; Shejwalkar & Houmansadr, NDSS'21), with the repo's settings.

On the updates Δ_k = θ_k − θ_g over the float entries (integer counters left out, spec D31):

    u_k = Δ_k / (‖Δ_k‖ + 1e−5)                    (``dnc_normalize``; the raw Δ_k otherwise, as in the original)
    m̂  = ⌊γ·n⌋ (γ of the threat model),   r = ⌊c·m̂⌋ clients to remove, c = ``dnc_filter_frac``
    repeat ``dnc_niters`` times:
        J  = b = ``dnc_subdim`` coordinates drawn without replacement (all of them when d <= b)
        U  = [u_k[J]]_k,  μ = mean_k U_k,  v = top right-singular vector of U − μ (thin SVD)
        σ_k = ⟨U_k − μ, v⟩²;  keep the n − r clients with the smallest σ (ties: the smaller client id)
    kept = union (``dnc_combine = union``) or intersection of the iterations' kept sets
    θ_g ← (1/|kept|) Σ_{k∈kept} θ_k                 (uniform mean of the kept clients' whole states)

The coordinate subsets come from ``round_generator(seed, round)``, so they do not depend on the client order, and
kept clients are mapped by client id (the repo uses positions as ids, D2). If an intersection comes out empty, the
union is used and a warning logged. The diagnostics report σ_k (averaged over the iterations) and the removed ids.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from spmc.defenses._options import check_bool, check_choice, check_int, check_real, exclude_int_buffers_option
from spmc.defenses.base import Aggregate, RoundInputs, as_weight_list, round_generator, stat_mask, weighted_average
from spmc.defenses.krum import lowest_scores
from spmc.defenses.linalg import row_sq_norms
from spmc.options import option
from spmc.threat import ThreatModel, num_attackers

log = logging.getLogger(__name__)

Combine = Literal["union", "intersection"]
COMBINES: tuple[str, ...] = ("union", "intersection")
NORM_EPS = 1e-5


def row_norms(vectors: torch.Tensor) -> torch.Tensor:
    """‖x_k‖ of every row of ``vectors`` [n, d], accumulated in float64 over column blocks; float64 [n]."""
    return row_sq_norms(vectors).sqrt()


def num_removed(n: int, gamma: float, filter_frac: float) -> int:
    """r = ⌊c·⌊γ·n⌋⌋ (guarded against float error like m = ⌊γK⌋, spec §2.1)."""
    m_hat = num_attackers(gamma, n)
    return int(filter_frac * m_hat + 1e-9)


def dnc_outlier_scores(sample: torch.Tensor) -> torch.Tensor:
    """σ_k = ⟨U_k − μ, v⟩² with v the top right-singular vector of the centred [n, b] matrix; float64 [n] on CPU."""
    u = sample.to(torch.float64)
    centred = u - u.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    scores: torch.Tensor = ((centred @ vh[0]) ** 2).cpu()
    return scores


def dnc_keep(
    vectors: torch.Tensor,
    client_ids: Sequence[int],
    removed: int,
    generator: torch.Generator,
    subdim: int = 10_000,
    niters: int = 1,
    combine: Combine = "union",
    row_scale: torch.Tensor | None = None,
) -> tuple[list[int], list[torch.Tensor]]:
    """Positions of the kept rows of ``vectors`` [n, d], sorted, and the σ of every iteration.

    ``generator`` draws the coordinate subsets (torch.randperm on the CPU, then moved to the vectors' device).
    ``row_scale`` (float64 [n], e.g. 1/(‖Δ_k‖ + 1e−5)) multiplies each row after sampling, which is the same as
    normalising first but touches only the b sampled columns.
    """
    n, d = vectors.shape
    if not 0 <= removed < n:
        raise ValueError(f"dnc: cannot remove r = {removed} of n = {n} clients; need 0 <= r < n")
    kept_sets: list[set[int]] = []
    all_scores: list[torch.Tensor] = []
    for _ in range(niters):
        if d > subdim:
            cols = torch.randperm(d, generator=generator)[:subdim].to(vectors.device)
            sample = vectors[:, cols]
        else:
            sample = vectors
        sample = sample.to(torch.float64)
        if row_scale is not None:
            sample = sample * row_scale.to(sample.device)[:, None]
        scores = dnc_outlier_scores(sample)
        all_scores.append(scores)
        kept_sets.append(set(lowest_scores(scores, client_ids, n - removed)))
    if combine == "union":
        kept = set().union(*kept_sets)
    elif combine == "intersection":
        kept = set.intersection(*kept_sets)
        if not kept:
            log.warning("dnc: the intersection of the %d kept sets is empty; using their union", niters)
            kept = set().union(*kept_sets)
    else:
        raise ValueError(f"dnc_combine: unknown value {combine!r}; allowed: {', '.join(COMBINES)}")
    return sorted(kept), all_scores


@dataclass(frozen=True)
class DnCOptions:
    """DnC's options (``dnc_*``); γ and the seed come from the threat model."""

    filter_frac: float = option(
        0.5,
        key="dnc_filter_frac",
        help="c: remove r = ⌊c·m̂⌋ clients, m̂ = ⌊γn⌋; >= 0 (ALGORITHMS.md §6.2, D18)",
    )
    niters: int = option(
        1, key="dnc_niters", help="SVD iterations, each on a fresh coordinate subset; integer >= 1 (ALGORITHMS.md §6.2)"
    )
    subdim: int = option(
        10_000,
        key="dnc_subdim",
        help="b: coordinates sampled per iteration (all when d <= b); integer >= 1 (ALGORITHMS.md §6.2)",
    )
    normalize: bool = option(
        True,
        key="dnc_normalize",
        help="unit-normalise the updates for detection (the repo's) (ALGORITHMS.md §6.2, D18)",
    )
    combine: Combine = option(
        "union",
        key="dnc_combine",
        help="kept sets across iterations: union (repo) or intersection (original) (ALGORITHMS.md §6.2, D18)",
    )
    exclude_int_buffers: bool = exclude_int_buffers_option()

    def __post_init__(self) -> None:
        check_real("dnc_filter_frac", self.filter_frac, ge=0.0)
        check_int("dnc_niters", self.niters, 1)
        check_int("dnc_subdim", self.subdim, 1)
        check_bool("dnc_normalize", self.normalize)
        check_choice("dnc_combine", self.combine, COMBINES)
        check_bool("exclude_int_buffers", self.exclude_int_buffers)


class DnC:
    """Divide-and-Conquer: drop the clients most aligned with the top singular direction, average the rest."""

    name: ClassVar[str] = "dnc"
    description: ClassVar[str] = "DnC: SVD outlier scores on sampled coordinates, mean of the kept clients (spec §6.2)"
    needs_server_data: ClassVar[bool] = False
    options_type: ClassVar[type[DnCOptions]] = DnCOptions

    def __init__(self, options: DnCOptions | None = None, threat: ThreatModel | None = None) -> None:
        self.options = options if options is not None else DnCOptions()
        threat = threat if threat is not None else ThreatModel()
        self.gamma = threat.gamma
        self.seed = threat.seed

    def check_clients(self, n: int) -> None:
        """Raise unless a round of n clients keeps some: r = ⌊c·⌊γ·n⌋⌋ < n (checked before a run starts)."""
        removed = num_removed(n, self.gamma, self.options.filter_frac)
        if removed >= n:
            raise ValueError(
                f"dnc_filter_frac: removing r = ⌊c·⌊γ·n⌋⌋ = {removed} of n = {n} clients leaves none "
                f"(c = {self.options.filter_frac}, γ = {self.gamma}); need r < n"
            )

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        ids = inputs.client_ids
        n = inputs.n
        removed = num_removed(n, self.gamma, self.options.filter_frac)
        if removed >= n:
            raise ValueError(
                f"dnc_filter_frac: removing r = ⌊c·⌊γ·n⌋⌋ = {removed} of n = {n} clients leaves none "
                f"(c = {self.options.filter_frac}, γ = {self.gamma}); need r < n"
            )
        mask = stat_mask(inputs.layout, self.options.exclude_int_buffers, inputs.client_states.device)
        vectors = inputs.updates[:, mask]
        scale = 1.0 / (row_norms(vectors) + NORM_EPS) if self.options.normalize else None
        gen = round_generator(self.seed, inputs.round)
        kept, scores = dnc_keep(
            vectors, ids, removed, gen, self.options.subdim, self.options.niters, self.options.combine, scale
        )
        w = torch.zeros(n, dtype=torch.float64)
        w[kept] = 1.0 / len(kept)
        kept_set = set(kept)
        return Aggregate(
            global_state=weighted_average(inputs.client_states, w.to(inputs.client_states.device)),
            weights=w,
            accepted=tuple(ids[i] for i in kept),
            diagnostics={
                "scores": as_weight_list(torch.stack(scores).mean(dim=0), ids),
                "weights": as_weight_list(w, ids),
                "removed": sorted(ids[i] for i in range(n) if i not in kept_set),
            },
        )
