"""Conversions between Flower records and spmc's flat states and diagnostics.

* a model state travels as an :class:`~flwr.app.ArrayRecord` keyed by ``state_dict`` names, in the model's own
  dtypes; :func:`state_to_arrays` and :func:`arrays_to_state` convert through :class:`~spmc.params.ParamLayout`,
  and the latter refuses anything that does not fit the layout exactly;
* a defense's diagnostics (nested dicts of numbers, tensors, lists) become a flat
  :class:`~flwr.app.MetricRecord` of numbers with dotted keys (:func:`flatten_metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord

from spmc.params import ParamLayout

MetricValue = int | float | list[int] | list[float]


class MalformedUpdate(ValueError):
    """A client's reply that cannot be turned into a valid state of the model (never aggregated)."""


def state_to_arrays(layout: ParamLayout, state: torch.Tensor) -> ArrayRecord:
    """The flat ``state`` as an ArrayRecord of named tensors in the model's dtypes (integer counters rounded)."""
    return ArrayRecord(layout.unflatten(state.detach().cpu()))


def arrays_to_state(layout: ParamLayout, arrays: ArrayRecord) -> torch.Tensor:
    """The flat float32 state of ``arrays``; raises :class:`MalformedUpdate` unless its names and shapes are
    exactly the layout's and every value is a number."""
    names = [e.name for e in layout.entries]
    if set(arrays.keys()) != set(names):
        missing = sorted(set(names) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(names))
        raise MalformedUpdate(f"arrays do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    pieces = []
    for entry in layout.entries:
        try:
            value = arrays[entry.name].numpy()
        except Exception as err:  # a corrupt payload can fail in many ways inside numpy
            raise MalformedUpdate(f"array {entry.name!r} cannot be decoded: {err}") from None
        if tuple(value.shape) != entry.shape:
            raise MalformedUpdate(f"array {entry.name!r} has shape {tuple(value.shape)}; expected {entry.shape}")
        if not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
            raise MalformedUpdate(f"array {entry.name!r} has dtype {value.dtype}; expected numbers")
        pieces.append(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)).reshape(-1))
    return torch.cat(pieces) if pieces else torch.zeros(0)


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    return None


def _numbers(values: list[Any]) -> list[int] | list[float] | None:
    items = [_number(v) for v in values]
    numbers = [v for v in items if v is not None]
    if not items or len(numbers) != len(items):
        return None
    if all(isinstance(v, int) for v in numbers):
        return [int(v) for v in numbers]
    return [float(v) for v in numbers]


def flatten_metrics(values: Mapping[str, Any], prefix: str = "") -> dict[str, MetricValue]:
    """Numbers, lists of numbers and tensors of ``values``, nested dicts flattened to ``a.b`` keys.

    Booleans become 0/1; anything else (strings, None, nested lists) is left out.
    """
    out: dict[str, MetricValue] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, name + "."))
        elif isinstance(value, torch.Tensor):
            flat = value.detach().cpu().reshape(-1).tolist()
            if value.dim() == 0:
                out[name] = flat[0] if isinstance(flat[0], (int, float)) else float(flat[0])
            elif (numbers := _numbers(flat)) is not None:
                out[name] = numbers
        elif isinstance(value, (list, tuple)):
            if (numbers := _numbers(list(value))) is not None:
                out[name] = numbers
        elif (number := _number(value)) is not None:
            out[name] = number
    return out


def metric_record(values: Mapping[str, Any], prefix: str = "") -> MetricRecord:
    """:func:`flatten_metrics` as a MetricRecord."""
    return MetricRecord(flatten_metrics(values, prefix))


def finite_number(value: Any) -> float | None:
    """``value`` as a finite float, or None."""
    number = _number(value)
    if number is None or not math.isfinite(float(number)):
        return None
    return float(number)
