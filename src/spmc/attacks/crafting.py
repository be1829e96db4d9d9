"""Shared arithmetic of the update-crafting attacks (ATTACKS.md §A4): the benign set, column-block float64
statistics of the updates, and the cast back to the states' dtype without overflow.

Every crafting attack works on updates u = θ − θ_g of the flat states (integer counters included, as the
attacks of the literature work on the whole flat vector; the server rounds counters in ``finalise_global``).

**The benign set.** :func:`benign_set` is ``inputs.benign_states`` (the benign states of the round under
``attacker_knowledge = full``; the attackers' own clean estimates under ``partial``). When it is empty (every
participant of the round is an attacker) the attackers' own states are the estimate. :func:`round_clients` is the
round's K as the attackers know it (the run's K when the benign rows are an estimate without ids).

**Float64 over column blocks.** A state has up to millions of entries; statistics are accumulated in float64 over
column blocks of :data:`BLOCK` entries (no [n, d] float64 copy). Results are cast back with :func:`to_states`, which
clamps to the finite range of the target dtype, so finite inputs never give ±Inf (float32 states are at most
3.4e38, so their float64 sums and squares never overflow and no NaN arises).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from spmc.attacks.base import CraftingInputs

BLOCK = 1 << 16


def column_blocks(width: int, block: int = BLOCK) -> Iterator[slice]:
    """The column slices ``[start, start + block)`` covering ``range(width)``, in order."""
    for start in range(0, width, block):
        yield slice(start, start + block)


def benign_set(inputs: CraftingInputs) -> torch.Tensor:
    """The benign states [n, d] the attackers estimate from: ``inputs.benign_states``, or the attackers' own
    states when it is empty."""
    if inputs.benign_states.shape[0] > 0:
        return inputs.benign_states
    return inputs.attacker_states


def round_clients(inputs: CraftingInputs, num_clients: int) -> int:
    """K of the round as the attackers know it: the attackers plus the benign clients whose states they see
    (``benign_ids``); when the benign rows are an estimate without ids (``attacker_knowledge = partial``: the
    attackers' clean models), the run's K = ``num_clients`` (at least the m attackers)."""
    m = inputs.attacker_states.shape[0]
    if inputs.benign_ids or inputs.benign_states.shape[0] == 0:
        return m + len(inputs.benign_ids)
    return max(num_clients, m)


def block_updates(states: torch.Tensor, global_state: torch.Tensor, cols: slice) -> torch.Tensor:
    """u = θ − θ_g on the columns ``cols``, float64 [n, |cols|]."""
    return states[:, cols].to(torch.float64) - global_state[cols].to(torch.float64)


def mean_std(updates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coordinate mean μ and sample standard deviation σ (correction 1, as ``torch.std`` in the reference
    implementations of LIE and min-max) of the float64 rows [n, b]; σ = 0 when n < 2 (a single update has no
    spread; the sample std would be NaN)."""
    n = updates.shape[0]
    mu = updates.mean(dim=0)
    if n < 2:
        return mu, torch.zeros_like(mu)
    # two-pass Σ(u − μ)²/(n − 1): the same value as ``torch.std``, which is ~10× slower over dim 0 of a short matrix
    return mu, ((updates - mu) ** 2).sum(dim=0).div_(n - 1).sqrt_()


def to_states(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """float64 ``values`` cast to the dtype and device of ``like``, clamped to the dtype's finite range (±Inf →
    ±max; NaN, which finite inputs never produce here, → 0)."""
    big = torch.finfo(like.dtype).max
    out = torch.nan_to_num(values, nan=0.0, posinf=big, neginf=-big).clamp(-big, big)
    return out.to(dtype=like.dtype, device=like.device)


def repeat_rows(state: torch.Tensor, m: int) -> torch.Tensor:
    """The one crafted state [d] sent by all m colluding attackers, as [m, d]."""
    return state.unsqueeze(0).expand(m, -1).clone()
