"""Flat model states: convert between an ``nn.Module`` and one 1-D float vector (DESIGN.md, "Flat vectors").

A *state* is every trainable parameter, every float buffer (BatchNorm running statistics) and every integer
counter (``num_batches_tracked``), in ``state_dict`` order, flattened and concatenated into one float32 vector.
Integer counters are stored as floats (exact below 2**24) and rounded back when loaded into a module. Spec §0
calls the parameter part vec_P and the whole state vec_S; D31 asks that integer counters stay out of every
distance, norm, cosine and sign, which :attr:`ParamLayout.stat_mask` makes easy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn


class EntryKind(str, Enum):
    """What one named tensor of a state is."""

    PARAM = "param"
    FLOAT_BUFFER = "float_buffer"
    INT_BUFFER = "int_buffer"


@dataclass(frozen=True)
class Entry:
    """One named tensor of a state and where it lives in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    kind: EntryKind
    dtype: torch.dtype

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.numel)


class ParamLayout:
    """Names, shapes and offsets of a model state in its flat vector, with masks by kind."""

    def __init__(self, entries: list[Entry]) -> None:
        self.entries: tuple[Entry, ...] = tuple(entries)
        self.dim: int = sum(e.numel for e in entries)
        self._masks: dict[tuple[str, torch.device], torch.Tensor] = {}

    @classmethod
    def from_module(cls, module: nn.Module) -> ParamLayout:
        """Layout of ``module.state_dict()``; parameters are the tensors with ``requires_grad`` registered as such."""
        param_names = {name for name, _ in module.named_parameters()}
        entries: list[Entry] = []
        offset = 0
        for name, tensor in module.state_dict(keep_vars=True).items():
            if name in param_names:
                kind = EntryKind.PARAM
            elif tensor.is_floating_point():
                kind = EntryKind.FLOAT_BUFFER
            else:
                kind = EntryKind.INT_BUFFER
            numel = tensor.numel()
            entries.append(Entry(name, tuple(tensor.shape), offset, numel, kind, tensor.dtype))
            offset += numel
        return cls(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ParamLayout):
            return NotImplemented
        return self.entries == other.entries

    def __hash__(self) -> int:
        return hash(self.entries)

    @property
    def params(self) -> tuple[Entry, ...]:
        """Trainable parameter entries in registration order (spec §1.3 order for per-tensor operations)."""
        return tuple(e for e in self.entries if e.kind is EntryKind.PARAM)

    @property
    def num_params(self) -> int:
        return sum(e.numel for e in self.params)

    def mask(self, *kinds: EntryKind, device: torch.device | str = "cpu") -> torch.Tensor:
        """Boolean [d] mask of the entries of the given kinds (cached per device)."""
        key = ("|".join(sorted(k.value for k in kinds)), torch.device(device))
        if key not in self._masks:
            m = torch.zeros(self.dim, dtype=torch.bool)
            for e in self.entries:
                if e.kind in kinds:
                    m[e.slice] = True
            self._masks[key] = m.to(device)
        return self._masks[key]

    def param_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Mask of vec_P (trainable parameters only)."""
        return self.mask(EntryKind.PARAM, device=device)

    def stat_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Mask of every float entry (parameters and float buffers); integer counters left out (spec D31)."""
        return self.mask(EntryKind.PARAM, EntryKind.FLOAT_BUFFER, device=device)

    def int_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Mask of the integer counters (``num_batches_tracked``)."""
        return self.mask(EntryKind.INT_BUFFER, device=device)

    def flatten(self, module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """vec_S(module): the whole state as one vector."""
        sd = module.state_dict()
        return torch.cat([sd[e.name].detach().reshape(-1).to(dtype) for e in self.entries])

    def flatten_state_dict(self, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The same as :meth:`flatten` for a plain ``{name: tensor}`` mapping; every entry must be present."""
        missing = [e.name for e in self.entries if e.name not in state]
        if missing:
            raise ValueError(f"state is missing entries {missing[:5]} (expected {len(self.entries)} entries)")
        return torch.cat([state[e.name].detach().reshape(-1).to(dtype) for e in self.entries])

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` in the module's own dtypes (integer counters rounded)."""
        self.check(vec)
        out: dict[str, torch.Tensor] = {}
        for e in self.entries:
            piece = vec[e.slice].reshape(e.shape)
            if e.kind is EntryKind.INT_BUFFER:
                piece = piece.round()
            out[e.name] = piece.to(e.dtype)
        return out

    def load(self, module: nn.Module, vec: torch.Tensor) -> None:
        """Copy ``vec`` into ``module``'s tensors in place."""
        self.check(vec)
        sd = module.state_dict()
        with torch.no_grad():
            for e in self.entries:
                piece = vec[e.slice].reshape(e.shape)
                if e.kind is EntryKind.INT_BUFFER:
                    piece = piece.round()
                sd[e.name].copy_(piece)

    def views(self, vec: torch.Tensor, kind: EntryKind | None = None) -> Iterator[tuple[Entry, torch.Tensor]]:
        """Per-tensor views of ``vec`` (or of each row of a [n, d] matrix), optionally of one kind only."""
        for e in self.entries:
            if kind is None or e.kind is kind:
                yield e, vec[..., e.slice]

    def check(self, vec: torch.Tensor) -> None:
        """Raise if ``vec``'s last dimension is not this layout's size."""
        if vec.shape[-1] != self.dim:
            raise ValueError(f"state vector has {vec.shape[-1]} entries; the model layout needs {self.dim}")
