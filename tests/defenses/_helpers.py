"""Tiny layouts and a RoundInputs builder shared by the defense tests."""

from __future__ import annotations

import torch
from torch import nn

from spmc.defenses.base import RoundInputs
from spmc.params import ParamLayout

LINEAR = ParamLayout.from_module(nn.Linear(2, 1))  # 3 parameters
BN = ParamLayout.from_module(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))  # 15 entries; entry 14 is the counter


def make_inputs(
    states: torch.Tensor,
    ids: tuple[int, ...] | None = None,
    *,
    global_state: torch.Tensor | None = None,
    layout: ParamLayout = LINEAR,
    round_index: int = 0,
) -> RoundInputs:
    """RoundInputs for ``states`` [n, d]: ids 0..n-1 unless given, global state zeros (states' dtype) unless given,
    unit counts."""
    n, d = states.shape
    return RoundInputs(
        global_state=torch.zeros(d, dtype=states.dtype) if global_state is None else global_state,
        client_states=states,
        client_ids=tuple(range(n)) if ids is None else ids,
        num_samples=torch.ones(n, dtype=torch.float64),
        layout=layout,
        round=round_index,
    )
