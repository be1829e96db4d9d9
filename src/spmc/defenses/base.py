"""The defense interface (DESIGN.md "Defense interface"): one object per method, one ``aggregate`` method.

A defense receives every participating client's flat state as one ``[n, d]`` tensor with the stable client ids,
and returns the new global state plus what it decided (weights, accepted clients, diagnostics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from spmc.defenses.linalg import column_slices
from spmc.defenses.server_data import ServerData
from spmc.params import ParamLayout


@dataclass(frozen=True)
class RoundInputs:
    """Everything a defense may look at in one round.

    ``client_states[i]`` belongs to client ``client_ids[i]``; ids are stable across rounds and never positions.
    ``server_data`` (a :class:`spmc.defenses.server_data.ServerData`) is only filled for defenses that declare
    ``needs_server_data`` (spec §5); ``malicious_ids`` is never given to a defense (the engine keeps it).
    """

    global_state: torch.Tensor
    client_states: torch.Tensor
    client_ids: tuple[int, ...]
    num_samples: torch.Tensor
    layout: ParamLayout
    round: int
    server_data: ServerData | None = None

    def __post_init__(self) -> None:
        if self.client_states.dim() != 2:
            raise ValueError(
                f"client_states must be [n, d] (one flat state per client); got shape {tuple(self.client_states.shape)}"
            )
        n, d = self.client_states.shape
        if not self.client_states.is_floating_point() or self.global_state.dtype != self.client_states.dtype:
            raise ValueError(
                f"client_states have dtype {self.client_states.dtype} and global_state {self.global_state.dtype}; "
                "both must be the same floating-point dtype"
            )
        if len(self.client_ids) != n:
            raise ValueError(f"client_ids has {len(self.client_ids)} ids for {n} client states")
        if self.num_samples.shape != (n,):
            raise ValueError(f"num_samples has shape {tuple(self.num_samples.shape)}; expected ({n},)")
        if self.global_state.shape != (d,):
            raise ValueError(f"global_state has shape {tuple(self.global_state.shape)}; expected ({d},)")
        self.layout.check(self.global_state)

    @property
    def n(self) -> int:
        return len(self.client_ids)

    @property
    def updates(self) -> torch.Tensor:
        """Δ_k = θ_k − θ_g for every client, ``[n, d]`` (spec §0); ``ValueError`` when one overflows the dtype."""
        updates = self.client_states - self.global_state
        bad = (~torch.isfinite(updates).all(dim=1)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"client_states: the updates θ_k − θ_g of clients {[self.client_ids[i] for i in bad]} overflow "
                f"{self.client_states.dtype}; every update must be finite"
            )
        return updates


@dataclass
class Aggregate:
    """A defense's decision: the new global state, per-client weights if any, the accepted client ids."""

    global_state: torch.Tensor
    weights: torch.Tensor | None = None
    accepted: tuple[int, ...] | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)
    eval_state: torch.Tensor | None = None
    """The model to evaluate when it differs from the broadcast one (Finetuning without broadcast, spec §6.10)."""


class Defense(Protocol):
    """What the engine needs of a server-side defense.

    A defense is built from its own frozen options dataclass (whose constructor is the one place its options are
    validated), plus a :class:`spmc.threat.ThreatModel` for the few that need the attacker count or the seed. A
    defense with options points to that dataclass with the class attribute ``options_type`` and declares each field
    with :func:`spmc.options.option` (its flat configuration key, one line of help);
    :func:`spmc.options.build_method` composes the defense from the configuration's values. Every argument has a
    default, so ``DEFENSES[name]()`` is the defense with its default options.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    needs_server_data: ClassVar[bool]

    def aggregate(self, inputs: RoundInputs) -> Aggregate: ...


@runtime_checkable
class Stateful(Protocol):
    """A defense that keeps state across rounds (FoolsGold's histories): checkpoints save and restore it.

    ``state_dict()`` returns ``{client id: tensor on the CPU}``; ``load_state_dict`` accepts what it returned,
    with string ids as written by JSON-like stores, and raises ``ValueError`` on anything else.
    """

    def state_dict(self) -> dict[int, torch.Tensor]: ...

    def load_state_dict(self, state: Mapping[int | str, torch.Tensor]) -> None: ...


_BLOCK = 1 << 15


def column_scales(values: torch.Tensor) -> torch.Tensor:
    """2^(e−1) per column of ``values`` [n, b], where 2^e > max |value| ≥ 2^(e−1), float64 [b] (never 0 or inf).

    Dividing by a power of two is exact, so a mean taken on the scaled columns and scaled back equals the plain
    float64 mean wherever that one does not overflow, and stays finite where it would."""
    _, exponent = torch.frexp(values.abs().amax(dim=0).to(torch.float64))
    return torch.ldexp(torch.ones_like(exponent, dtype=torch.float64), exponent - 1)


def weighted_average(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k θ_k over the whole state, accumulated in float64 over column blocks (no [n, d] float64 copy) and
    returned in the states' dtype. Float64 states are summed on columns divided by :func:`column_scales`, so no
    finite input overflows (weights summing to at most 1): a column at the largest float64 whose normalised sum
    exceeds 1 by rounding alone (softmax weights summing to 1 + 2⁻⁵²) gives that largest value, not ±inf."""
    if weights.shape != (states.shape[0],):
        raise ValueError(f"weights has shape {tuple(weights.shape)}; expected ({states.shape[0]},)")
    w = weights.to(device=states.device, dtype=torch.float64)
    out = torch.empty(states.shape[1], dtype=states.dtype, device=states.device)
    for cols in column_slices(states.shape[1], _BLOCK):
        block = states[:, cols].to(torch.float64)
        if states.dtype == torch.float64:
            scale = column_scales(block)
            normed = block / scale
            unit = w @ normed
            value = unit * scale
            rounding = ~torch.isfinite(value) & (unit.abs() <= normed.abs().amax(dim=0) * (1.0 + 1e-9))
            out[cols] = torch.where(rounding, unit.sign() * torch.finfo(torch.float64).max, value)
        else:
            out[cols] = w @ block
    return out


def finite_global(state: torch.Tensor, defense: str) -> torch.Tensor:
    """``state`` unchanged when every entry is finite, else ``ValueError``: the new global state overflowed its dtype
    (the clients' states, though finite, are too far from each other or from the global state)."""
    if not bool(torch.isfinite(state).all()):
        raise ValueError(
            f"{defense}: the new global state overflows {state.dtype}; the client states are finite but too large"
        )
    return state


def stable_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of the rows of ``values`` [n, b], float64 [b], finite for any finite input (see
    :func:`column_scales`); equal to ``values.double().mean(0)`` wherever that is finite."""
    v = values.to(torch.float64)
    scale = column_scales(v)
    return (v / scale).mean(dim=0) * scale


def as_weight_list(weights: torch.Tensor, client_ids: Sequence[int]) -> dict[str, float]:
    """``{client_id: weight}`` for the run log."""
    return {str(cid): float(w) for cid, w in zip(client_ids, weights.tolist())}


def stat_mask(
    layout: ParamLayout, exclude_int_buffers: bool = True, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Entries that enter distances, norms, cosines and signs: every float entry, integer counters left out
    (spec D31; ``exclude_int_buffers = False`` keeps them, the repo profile)."""
    if exclude_int_buffers:
        return layout.stat_mask(device)
    return torch.ones(layout.dim, dtype=torch.bool, device=device)


def round_generator(seed: int, round_index: int) -> torch.Generator:
    """A generator for a defense's own randomness in one round (DnC's coordinate subsets, CRFL's noise):
    depends on the experiment seed and the round only, never on the order of the clients."""
    return torch.Generator().manual_seed((seed * 1_000_003 + round_index) % (2**63))
