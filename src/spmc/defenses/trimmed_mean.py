"""Coordinate-wise trimmed mean (spec §6.11 [REC]; Yin, Chen, Ramchandran, Bartlett, ICML'18).

For every float coordinate j, with s_1 <= … <= s_n the sorted client values θ_k[j]:

    trim_extremes      θ_g[j] ← (1/(n − 2k)) Σ_{i=k+1}^{n−k} s_i       (drop the k largest and the k smallest)
    closest_to_median  θ_g[j] ← mean of the n − 2k values nearest to median(s)
                       (median of an even count = mean of the two middle values; ties in the distance go to the
                       smaller value, so the result does not depend on the client order)

k = ``trimmed_mean_k``, or m = ⌊γK⌋ when None; needs n > 2k. States and updates give the same result because θ_g
is common. Integer counters take the plain mean (spec D31). No server momentum (the repo's momentum 0.9 and its
n − k − 1 closest-to-median values are not the original rule, spec §6.11).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from spmc.defenses._options import check_bool, check_choice, check_int, exclude_int_buffers_option
from spmc.defenses.base import Aggregate, RoundInputs, stable_mean, stat_mask
from spmc.defenses.median import coordinate_median, coordinatewise
from spmc.options import option
from spmc.threat import ThreatModel, resolve_count

TrimMode = Literal["trim_extremes", "closest_to_median"]
TRIM_MODES: tuple[str, ...] = ("trim_extremes", "closest_to_median")


def trimmed_mean(values: torch.Tensor, k: int) -> torch.Tensor:
    """Per column of ``values`` [n, d]: drop the k largest and the k smallest, average the rest (float64 sum)."""
    n = values.shape[0]
    if k < 0 or n <= 2 * k:
        raise ValueError(f"trimmed_mean_k: trimming k = {k} from each side needs n > 2k clients; got n = {n}")
    s = values.sort(dim=0).values[k : n - k]
    return stable_mean(s).to(values.dtype)


def closest_to_median_mean(values: torch.Tensor, keep: int) -> torch.Tensor:
    """Per column of ``values`` [n, d]: the mean of the ``keep`` values nearest to the column's median.

    The median of an even count is the mean of the two middle values. Distances are taken on the sorted values and
    ordered stably, so a tie goes to the smaller value and the result depends only on the multiset of values.
    """
    n = values.shape[0]
    if not 1 <= keep <= n:
        raise ValueError(f"keep: got {keep}; must be between 1 and n = {n}")
    s = values.sort(dim=0).values
    med = coordinate_median(s.to(torch.float64))
    dist = (s.to(torch.float64) - med).abs()
    nearest = dist.argsort(dim=0, stable=True)[:keep]
    return stable_mean(s.gather(0, nearest)).to(values.dtype)


def trimmed_rule(values: torch.Tensor, k: int, mode: TrimMode = "trim_extremes") -> torch.Tensor:
    """The per-coordinate rule of ``tm_mode`` with k trimmed from each side (n − 2k values kept)."""
    if mode == "trim_extremes":
        return trimmed_mean(values, k)
    if mode == "closest_to_median":
        n = values.shape[0]
        if k < 0 or n <= 2 * k:
            raise ValueError(f"trimmed_mean_k: trimming k = {k} from each side needs n > 2k clients; got n = {n}")
        return closest_to_median_mean(values, n - 2 * k)
    raise ValueError(f"tm_mode: unknown value {mode!r}; allowed: {', '.join(TRIM_MODES)}")


@dataclass(frozen=True)
class TrimmedMeanOptions:
    """The trimmed mean's options: k trimmed per side (None: m = ⌊γK⌋), the rule, integer counters left out."""

    k: int | None = option(
        None,
        key="trimmed_mean_k",
        help="k trimmed from each side per coordinate: integer >= 0, or None for m = ⌊γK⌋; needs n > 2k "
        "(ALGORITHMS.md §6.11)",
    )
    mode: TrimMode = option(
        "trim_extremes",
        key="tm_mode",
        help="trim_extremes (drop the k largest and k smallest) or closest_to_median (mean of the n − 2k values "
        "nearest the median) (ALGORITHMS.md §6.11)",
    )
    exclude_int_buffers: bool = exclude_int_buffers_option()

    def __post_init__(self) -> None:
        check_int("trimmed_mean_k", self.k, 0, none="m")
        check_choice("tm_mode", self.mode, TRIM_MODES)
        check_bool("exclude_int_buffers", self.exclude_int_buffers)


class TrimmedMean:
    """Coordinate-wise trimmed mean of the client states."""

    name: ClassVar[str] = "trimmed_mean"
    description: ClassVar[str] = "TrimmedMean: per coordinate drop the k largest and k smallest, average (spec §6.11)"
    needs_server_data: ClassVar[bool] = False
    options_type: ClassVar[type[TrimmedMeanOptions]] = TrimmedMeanOptions

    def __init__(self, options: TrimmedMeanOptions | None = None, threat: ThreatModel | None = None) -> None:
        self.options = options if options is not None else TrimmedMeanOptions()
        self.k = resolve_count(self.options.k, threat)

    def check_clients(self, n: int) -> None:
        """Raise unless a round of n clients keeps some value: n > 2k (checked before a run starts)."""
        if n <= 2 * self.k:
            allowed = f"k <= {(n - 1) // 2}"
            raise ValueError(
                f"trimmed_mean_k: trimming k = {self.k} from each side needs n > 2k clients; got n = {n} "
                f"(allowed: {allowed})"
            )

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        n = inputs.n
        if n <= 2 * self.k:
            raise ValueError(f"trimmed_mean_k: trimming k = {self.k} from each side needs n > 2k clients; got n = {n}")
        states = inputs.client_states
        robust = stat_mask(inputs.layout, self.options.exclude_int_buffers, states.device)
        return Aggregate(
            global_state=coordinatewise(states, robust, lambda v: trimmed_rule(v, self.k, self.options.mode)),
            weights=None,
            accepted=inputs.client_ids,
        )
