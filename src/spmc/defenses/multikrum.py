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

from spmc.defenses._options import check_bool, check_int, exclude_int_buffers_option
from spmc.defenses.base import Aggregate, RoundInputs, as_weight_list, weighted_average
from spmc.defenses.krum import KRUM_F_HELP, check_krum_size, krum_scores, lowest_scores, update_distances
from spmc.options import option
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

    f: int | None = option(None, key="krum_f", help=KRUM_F_HELP)
    select: int | None = option(
        None,
        key="multikrum_select",
        help="m', the clients averaged: integer >= 1, or None for n − f (ALGORITHMS.md §6.11)",
    )
    exclude_int_buffers: bool = exclude_int_buffers_option()

    def __post_init__(self) -> None:
        check_int("krum_f", self.f, 0, none="m")
        check_int("multikrum_select", self.select, 1, none="n − f")
        check_bool("exclude_int_buffers", self.exclude_int_buffers)


class MultiKrum:
    """Multi-Krum: the uniform mean of the m' client states with the lowest Krum scores."""

    name: ClassVar[str] = "multikrum"
    description: ClassVar[str] = "Multi-Krum: mean of the m' = n − f lowest Krum scores (spec §6.11)"
    needs_server_data: ClassVar[bool] = False
    options_type: ClassVar[type[MultiKrumOptions]] = MultiKrumOptions

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
