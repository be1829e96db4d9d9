"""Coordinate-wise median (Yin, Chen, Ramchandran, Bartlett, ICML'18; listed with the robust baselines, spec §6.11).

For every float coordinate j of the state (parameters and float BN buffers):

    θ_g[j] ← median_k θ_k[j]

with, for an even number of clients n, the mean of the two middle values ((s_{n/2} + s_{n/2+1}) / 2 of the sorted
values s; ``torch.median`` would return the lower one). States and updates give the same result because θ_g is
common to all clients. Integer counters (``num_batches_tracked``) take the plain mean of the clients (spec D31;
the engine rounds it); with ``exclude_int_buffers = False`` they take the median like every other entry.

:func:`coordinatewise` applies such a per-coordinate rule over column blocks; TrimmedMean and Bulyan use it too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from spmc.defenses._options import check_bool, exclude_int_buffers_option
from spmc.defenses.base import Aggregate, RoundInputs, stable_mean, stat_mask

_BLOCK = 1 << 18

ColumnRule = Callable[[torch.Tensor], torch.Tensor]


def coordinate_median(values: torch.Tensor) -> torch.Tensor:
    """Median of each column of ``values`` [n, d]; the mean of the two middle values when n is even.

    Returned in the input dtype (the two middle values are averaged in float64).
    """
    if values.dim() != 2 or values.shape[0] == 0:
        raise ValueError(f"values must be [n, d] with n >= 1; got shape {tuple(values.shape)}")
    n = values.shape[0]
    s = values.sort(dim=0).values
    if n % 2 == 1:
        return s[n // 2].clone()
    mid = s[n // 2 - 1].to(torch.float64) / 2 + s[n // 2].to(torch.float64) / 2  # no overflow at ±max
    return mid.to(values.dtype)


def coordinatewise(states: torch.Tensor, robust: torch.Tensor, rule: ColumnRule) -> torch.Tensor:
    """Apply ``rule`` ([n, b] → [b]) to the columns of ``states`` [n, d] where ``robust`` is True, over column blocks;
    the other columns (integer counters) get the plain mean over the rows, accumulated in float64."""
    if robust.shape != (states.shape[1],):
        raise ValueError(f"mask has shape {tuple(robust.shape)}; expected ({states.shape[1]},)")
    out = torch.empty(states.shape[1], dtype=states.dtype, device=states.device)
    plain = ~robust
    if bool(plain.any()):
        out[plain] = stable_mean(states[:, plain]).to(states.dtype)
    cols = robust.nonzero().squeeze(1)
    for start in range(0, cols.numel(), _BLOCK):
        idx = cols[start : start + _BLOCK]
        out[idx] = rule(states[:, idx]).to(states.dtype)
    return out


@dataclass(frozen=True)
class MedianOptions:
    """The median's option: integer counters left out (spec D31)."""

    exclude_int_buffers: bool = exclude_int_buffers_option()

    def __post_init__(self) -> None:
        check_bool("exclude_int_buffers", self.exclude_int_buffers)


class Median:
    """Coordinate-wise median of the client states."""

    name: ClassVar[str] = "median"
    description: ClassVar[str] = "Median: coordinate-wise median of the client states (spec §6.11)"
    needs_server_data: ClassVar[bool] = False
    options_type: ClassVar[type[MedianOptions]] = MedianOptions

    def __init__(self, options: MedianOptions | None = None) -> None:
        self.options = options if options is not None else MedianOptions()

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        states = inputs.client_states
        robust = stat_mask(inputs.layout, self.options.exclude_int_buffers, states.device)
        return Aggregate(
            global_state=coordinatewise(states, robust, coordinate_median),
            weights=None,
            accepted=inputs.client_ids,
        )
