"""Krum (spec §6.11 [REC]; Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS'17), the original rule.

On the updates Δ_k = θ_k − θ_g restricted to the float entries (integer counters left out, spec D31):

    D_ij    = ‖Δ_i − Δ_j‖²                                   (squared Euclidean distances)
    score_i = Σ of the n − f − 2 smallest D_ij over j ≠ i
    i*      = argmin_i score_i                               (ties: the smallest client id)
    θ_g     ← θ_{i*}  (= θ_g + Δ_{i*}, the whole state)

It needs n > 2f + 2. f = ``krum_f``, or m = ⌊γK⌋ when ``krum_f`` is None (f = 0 when there is no attack). No server
momentum (the repo's momentum path starts from a separately initialised vector, a bug, spec §6.11).

:func:`pairwise_sq_distances` is the one distance computation shared by Krum, Multi-Krum and Bulyan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from spmc.defenses._options import check_bool, check_int, exclude_int_buffers_option
from spmc.defenses.base import Aggregate, RoundInputs, as_weight_list, stat_mask
from spmc.defenses.linalg import gram
from spmc.options import option
from spmc.threat import ThreatModel, resolve_count


def pairwise_sq_distances(vectors: torch.Tensor) -> torch.Tensor:
    """D_ij = ‖x_i − x_j‖² for the rows of ``vectors`` [n, d], through the Gram identity ‖x_i‖² + ‖x_j‖² − 2⟨x_i, x_j⟩.

    The Gram matrix is accumulated in float64 over column blocks (no [n, d] float64 copy). The result is float64
    [n, n] on the CPU, symmetric, with a zero diagonal and no negative entries (rounding is clamped at 0).
    """
    g = gram(vectors).cpu()
    sq = g.diagonal().clone()
    dist = (sq[:, None] + sq[None, :] - 2.0 * g).clamp_min(0.0)
    dist = (dist + dist.T) / 2
    dist.fill_diagonal_(0.0)
    return dist


def check_krum_size(n: int, f: int, field: str = "krum_f") -> None:
    """Raise unless n > 2f + 2, the condition of Krum's guarantee (Blanchard et al. 2017)."""
    if n <= 2 * f + 2:
        allowed = f"f <= {(n - 3) // 2}" if n >= 3 else "no f: Krum needs at least 3 clients"
        raise ValueError(f"{field}: Krum needs n > 2f + 2 clients; got n = {n}, f = {f} (allowed: {allowed})")


def nearest_sums(dist: torch.Tensor, count: int) -> torch.Tensor:
    """Σ of the ``count`` smallest D_ij over j ≠ i for every row of a [n, n] distance matrix; float64 [n]."""
    n = dist.shape[0]
    if not 0 <= count <= n - 1:
        raise ValueError(f"count: got {count}; must be between 0 and n − 1 = {n - 1}")
    off = dist.to(torch.float64).clone()
    off.fill_diagonal_(float("inf"))
    return off.sort(dim=1).values[:, :count].sum(dim=1)


def krum_scores(dist: torch.Tensor, f: int) -> torch.Tensor:
    """score_i = sum of the n − f − 2 smallest D_ij over j ≠ i, from a [n, n] squared-distance matrix; float64 [n]."""
    n = dist.shape[0]
    check_krum_size(n, f)
    return nearest_sums(dist, n - f - 2)


def lowest_scores(scores: torch.Tensor, client_ids: Sequence[int], count: int, rel_tol: float = 1e-9) -> list[int]:
    """Positions of the ``count`` lowest scores, ties broken by the smaller client id, so the choice does not
    depend on the order of the clients.

    Scores that are equal in exact arithmetic can differ in the last bits depending on the order in which they were
    accumulated (two clients' DnC scores are always equal, for instance), so neighbours in sorted order closer
    than ``rel_tol`` × their magnitude are one tie group, ordered by client id.
    """
    values = scores.tolist()
    order = sorted(range(len(values)), key=lambda i: values[i])
    group, groups = 0, []
    for pos, i in enumerate(order):
        prev = values[order[pos - 1]] if pos else values[i]
        if values[i] - prev > rel_tol * max(abs(values[i]), abs(prev)):
            group += 1
        groups.append(group)
    ranked = sorted(zip(groups, order), key=lambda gi: (gi[0], client_ids[gi[1]]))
    return [i for _, i in ranked[:count]]


def update_distances(inputs: RoundInputs, exclude_int_buffers: bool) -> torch.Tensor:
    """Squared distances between the clients' updates over the float entries (spec D31), float64 [n, n]."""
    mask = stat_mask(inputs.layout, exclude_int_buffers, inputs.client_states.device)
    return pairwise_sq_distances(inputs.updates[:, mask])


#: ``krum_f``, declared alike by Krum and Multi-Krum.
KRUM_F_HELP = "f assumed attackers, integer >= 0, or None for m = ⌊γK⌋; needs n > 2f + 2 clients (ALGORITHMS.md §6.11)"


@dataclass(frozen=True)
class KrumOptions:
    """Krum's options: f assumed attackers (None: m = ⌊γK⌋ of the threat model), integer counters left out."""

    f: int | None = option(None, key="krum_f", help=KRUM_F_HELP)
    exclude_int_buffers: bool = exclude_int_buffers_option()

    def __post_init__(self) -> None:
        check_int("krum_f", self.f, 0, none="m")
        check_bool("exclude_int_buffers", self.exclude_int_buffers)


class Krum:
    """Original Krum: the global model becomes the client state with the lowest Krum score."""

    name: ClassVar[str] = "krum"
    description: ClassVar[str] = "Krum: the client nearest its n − f − 2 neighbours (squared distances) (spec §6.11)"
    needs_server_data: ClassVar[bool] = False
    options_type: ClassVar[type[KrumOptions]] = KrumOptions

    def __init__(self, options: KrumOptions | None = None, threat: ThreatModel | None = None) -> None:
        self.options = options if options is not None else KrumOptions()
        self.f = resolve_count(self.options.f, threat)

    def check_clients(self, n: int) -> None:
        """Raise unless a round of n clients allows Krum: n > 2f + 2 (checked before a run starts)."""
        check_krum_size(n, self.f)

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        ids = inputs.client_ids
        check_krum_size(inputs.n, self.f)
        dist = update_distances(inputs, self.options.exclude_int_buffers)
        scores = krum_scores(dist, self.f)
        best = lowest_scores(scores, ids, 1)[0]
        w = torch.zeros(inputs.n, dtype=torch.float64)
        w[best] = 1.0
        return Aggregate(
            global_state=inputs.client_states[best].clone(),
            weights=w,
            accepted=(ids[best],),
            diagnostics={
                "scores": as_weight_list(scores, ids),
                "weights": as_weight_list(w, ids),
                "removed": sorted(k for k in ids if k != ids[best]),
            },
        )
