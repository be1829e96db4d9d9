"""Multi-Krum (spec §6.11 [REC]; Blanchard et al., NeurIPS'17).

With the Krum scores of :mod:`spmc.defenses.krum` (squared distances between updates over the float entries,
score_i = Σ of the n − f − 2 smallest D_ij over j ≠ i), take the set M of the m' lowest-score clients (ties: the
smaller client id) and average their whole states uniformly:

    θ_g ← (1/m') Σ_{k∈M} θ_k        (= θ_g + mean of the selected updates)

f = ``krum_f`` (m = ⌊γK⌋ when None), m' = ``multikrum_select`` (n − f when None; the repo hard-codes 5). Needs
n > 2f + 2 and m' <= n.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from spmc.defenses.base import Aggregate, RoundInputs, as_weight_list, weighted_average
from spmc.defenses.krum import check_krum_size, krum_scores, lowest_scores, update_distances
from spmc.threat import ThreatModel, resolve_count


def multikrum_weights(scores: torch.Tensor, client_ids: tuple[int, ...], select: int) -> torch.Tensor:
    """Uniform weights 1/m' on the ``select`` lowest Krum scores (ties: smaller id), 0 elsewhere; float64 [n]."""
    n = scores.shape[0]
    if not 1 <= select <= n:
        raise ValueError(f"multikrum_select: got {select}; must be between 1 and the number of clients n = {n}")
    w = torch.zeros(n, dtype=torch.float64)
    w[lowest_scores(scores, client_ids, select)] = 1.0 / select
    return w


@dataclass(frozen=True)
class MultiKrumOptions:
    """Multi-Krum's options: f (None: m = ⌊γK⌋), m' = ``select`` (None: n − f), integer counters left out."""

    f: int | None = None
    select: int | None = None
    exclude_int_buffers: bool = True

    def __post_init__(self) -> None:
        if self.f is not None and self.f < 0:
            raise ValueError(f"krum_f: got {self.f}; must be an integer >= 0 (or None for m)")
        if self.select is not None and self.select < 1:
            raise ValueError(f"multikrum_select: got {self.select}; must be >= 1 (or None for n − f)")


class MultiKrum:
    """Multi-Krum: the uniform mean of the m' client states with the lowest Krum scores."""

    name: ClassVar[str] = "multikrum"
    description: ClassVar[str] = "Multi-Krum: mean of the m' = n − f lowest Krum scores (spec §6.11)"
    needs_server_data: ClassVar[bool] = False

    def __init__(self, options: MultiKrumOptions | None = None, threat: ThreatModel | None = None) -> None:
        self.options = options if options is not None else MultiKrumOptions()
        self.f = resolve_count(self.options.f, threat)

    def check_clients(self, n: int) -> None:
        """Raise unless a round of n clients allows Multi-Krum: n > 2f + 2 and m' <= n (checked before a run)."""
        check_krum_size(n, self.f)
        if self.options.select is not None and self.options.select > n:
            raise ValueError(
                f"multikrum_select: got {self.options.select}; must be between 1 and the clients per round, {n}"
            )

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        ids = inputs.client_ids
        check_krum_size(inputs.n, self.f)
        scores = krum_scores(update_distances(inputs, self.options.exclude_int_buffers), self.f)
        select = self.options.select if self.options.select is not None else inputs.n - self.f
        w = multikrum_weights(scores, ids, select)
        kept = w > 0
        return Aggregate(
            global_state=weighted_average(inputs.client_states, w.to(inputs.client_states.device)),
            weights=w,
            accepted=tuple(k for k, keep in zip(ids, kept.tolist()) if keep),
            diagnostics={
                "scores": as_weight_list(scores, ids),
                "weights": as_weight_list(w, ids),
                "removed": sorted(k for k, keep in zip(ids, kept.tolist()) if not keep),
            },
        )
