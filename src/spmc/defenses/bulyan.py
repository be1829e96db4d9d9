"""Bulyan (spec §6.4 [REC], D20; El Mhamdi, Guerraoui, Rouault, ICML'18), the original rule with f = ``bulyan_f``.

On the updates Δ_k = θ_k − θ_g over the float entries (integer counters left out, spec D31), needing n ≥ 4f + 3:

1. Selection: repeat θ = n − 2f times: among the R clients still remaining, Krum-score each one by the sum of its
   max(R − f − 2, 1) smallest **squared** distances to the other remaining clients; move the lowest score (ties:
   the smaller client id) into the selection set. (In the last step R = 2f + 1, where R − f − 2 = f − 1 is 0 for
   f = 1 and every score would be 0; at least the nearest neighbour is counted so the choice still looks at the
   data. A single remaining client is taken as is.)
2. Per coordinate j: with med_j the median of the θ selected Δ_k[j] (mean of the two middle values when θ is even),
   agg_j = the mean of the β = θ − 2f selected values nearest to med_j.
3. θ_g ← θ_g + agg; no server momentum. Integer counters get the plain mean of the selected clients' updates.

With n = 10, f = 1: θ = 8, β = 6. The repo's Bulyan (non-squared distances, β' = 5, client 0's model plus momentum
as the base) diverges; it is not emulated (spec §6.4, D20).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from spmc.defenses._options import check_bool, check_int, exclude_int_buffers_option
from spmc.defenses.base import Aggregate, RoundInputs, finite_global, stat_mask
from spmc.defenses.krum import lowest_scores, nearest_sums, pairwise_sq_distances
from spmc.defenses.median import coordinatewise
from spmc.defenses.trimmed_mean import closest_to_median_mean
from spmc.options import option


def check_bulyan_size(n: int, f: int) -> None:
    """Raise unless n ≥ 4f + 3 (El Mhamdi et al. 2018)."""
    if n < 4 * f + 3:
        allowed = f"f <= {(n - 3) // 4}" if n >= 3 else "no f: Bulyan needs at least 3 clients"
        raise ValueError(f"bulyan_f: Bulyan needs n >= 4f + 3 clients; got n = {n}, f = {f} (allowed: {allowed})")


def bulyan_select(dist: torch.Tensor, f: int, client_ids: Sequence[int]) -> list[int]:
    """Positions chosen by recursive Krum on a [n, n] squared-distance matrix, in the order they were chosen
    (θ = n − 2f of them; the score, over max(R − f − 2, 1) nearest, is recomputed among the R clients remaining)."""
    n = dist.shape[0]
    check_bulyan_size(n, f)
    remaining = list(range(n))
    selected: list[int] = []
    while len(selected) < n - 2 * f:
        r = len(remaining)
        if r == 1:
            selected.append(remaining.pop())
            break
        scores = nearest_sums(dist[remaining][:, remaining], max(r - f - 2, 1))
        best = lowest_scores(scores, [client_ids[i] for i in remaining], 1)[0]
        selected.append(remaining.pop(best))
    return selected


def bulyan_coordinate_step(updates: torch.Tensor, f: int) -> torch.Tensor:
    """Per column of the θ selected updates [θ, d]: the mean of the β = θ − 2f values nearest to the median."""
    return closest_to_median_mean(updates, updates.shape[0] - 2 * f)


@dataclass(frozen=True)
class BulyanOptions:
    """Bulyan's options: f assumed attackers (``bulyan_f``), integer counters left out."""

    f: int = option(
        1, key="bulyan_f", help="f assumed attackers, integer >= 0; needs n >= 4f + 3 clients (ALGORITHMS.md §6.4, D20)"
    )
    exclude_int_buffers: bool = exclude_int_buffers_option()

    def __post_init__(self) -> None:
        check_int("bulyan_f", self.f, 0)
        check_bool("exclude_int_buffers", self.exclude_int_buffers)


class Bulyan:
    """Bulyan: recursive Krum selection, then a coordinate-wise mean around the median, applied as an update."""

    name: ClassVar[str] = "bulyan"
    description: ClassVar[str] = "Bulyan: recursive Krum, then mean of the β values nearest the median (spec §6.4)"
    needs_server_data: ClassVar[bool] = False
    options_type: ClassVar[type[BulyanOptions]] = BulyanOptions

    def __init__(self, options: BulyanOptions | None = None) -> None:
        self.options = options if options is not None else BulyanOptions()

    def check_clients(self, n: int) -> None:
        """Raise unless a round of n clients allows Bulyan: n >= 4f + 3 (checked before a run starts)."""
        check_bulyan_size(n, self.options.f)

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        ids = inputs.client_ids
        check_bulyan_size(inputs.n, self.options.f)
        mask = stat_mask(inputs.layout, self.options.exclude_int_buffers, inputs.client_states.device)
        updates = inputs.updates
        chosen = bulyan_select(pairwise_sq_distances(updates[:, mask]), self.options.f, ids)
        rows = torch.tensor(sorted(chosen), dtype=torch.long, device=updates.device)
        agg = coordinatewise(updates[rows], mask, lambda v: bulyan_coordinate_step(v, self.options.f))
        new_global = (inputs.global_state.to(torch.float64) + agg.to(torch.float64)).to(inputs.global_state.dtype)
        kept = set(chosen)
        return Aggregate(
            global_state=finite_global(new_global, self.name),
            weights=None,
            accepted=tuple(k for i, k in enumerate(ids) if i in kept),
            diagnostics={
                "selection_order": [ids[i] for i in chosen],
                "removed": sorted(k for i, k in enumerate(ids) if i not in kept),
            },
        )
