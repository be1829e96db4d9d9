"""A method's options, declared next to it and composed into the flat configuration (DESIGN.md "Registries").

A defense or an attack takes its options as one frozen dataclass (``KrumOptions``, ``ScalingOptions``, ...). Each
field the configuration sets is declared with :func:`option`, which names its flat configuration key (``krum_f``,
TOML key, ``--set`` flag, sweep axis and Flower run-config key alike) and describes it in one line. The method class
points to its dataclass with ``options_type``. Then:

* :mod:`spmc.config` adds one field per key to ``Experiment``, typed by the dataclass's annotation, with its default
  and its description (:func:`option_specs`), so ``spmc list --options`` lists it;
* the dataclass's ``__post_init__`` is the one place that checks values (ranges, rules between options); the
  configuration runs it for every registered method, so a bad value is refused before a run starts;
* :func:`build_method` composes the method: its options from the configuration's values (:func:`options_from`)
  and whatever of the context (``threat``, ``settings``) its constructor takes.

A key may be declared by several methods (``krum_f`` by Krum and Multi-Krum, ``scale_factor`` by every scaling
attack) with the same type and default, or be a key of the configuration itself (``exclude_int_buffers``,
``rounds``): then it is one field. Adding a method with options touches its file and its registry line only.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["OptionSpec", "build_method", "option", "option_specs", "options_from"]


def option(default: Any, key: str, help: str) -> Any:
    """A dataclass field set by the configuration key ``key``, described by ``help`` (the unit or the allowed
    values, and the source, in one line)."""
    return dataclasses.field(default=default, metadata={"key": key, "help": help})


@dataclass(frozen=True)
class OptionSpec:
    """One configuration key of a method's options: the dataclass field ``name``, its type ``annotation``, its
    ``default`` and ``help``, and ``owner``, the options class that declares it."""

    key: str
    name: str
    annotation: Any
    default: Any
    help: str
    owner: str


def option_specs(options_type: type[Any]) -> list[OptionSpec]:
    """The configuration keys of the dataclass ``options_type`` (fields declared with :func:`option`)."""
    if not dataclasses.is_dataclass(options_type):
        raise TypeError(f"options_type {options_type!r} is not a dataclass")
    hints = typing.get_type_hints(options_type)
    specs = []
    for f in dataclasses.fields(options_type):
        key = f.metadata.get("key")
        if key is None:
            continue
        if f.default is dataclasses.MISSING:
            raise TypeError(f"{options_type.__name__}.{f.name}: an option needs a default")
        help_text = f.metadata.get("help", "")
        specs.append(OptionSpec(key, f.name, hints[f.name], f.default, help_text, options_type.__name__))
    return specs


def options_from(options_type: type[Any], values: Mapping[str, Any] | Any) -> Any:
    """An ``options_type`` instance from the configuration ``values`` (a mapping by key, or an object with the keys
    as attributes); a key ``values`` lacks keeps the dataclass default. Raises the dataclass's ``ValueError``."""
    kwargs = {}
    for spec in option_specs(options_type):
        if isinstance(values, Mapping):
            if spec.key in values:
                kwargs[spec.name] = values[spec.key]
        elif hasattr(values, spec.key):
            kwargs[spec.name] = getattr(values, spec.key)
    return options_type(**kwargs)


def build_method(cls: type[Any], values: Mapping[str, Any] | Any, **context: Any) -> Any:
    """``cls`` built with its options from ``values`` (when it declares ``options_type``) and the entries of
    ``context`` its constructor takes by name (``threat``, ``settings``)."""
    params = inspect.signature(cls).parameters
    kwargs = {name: value for name, value in context.items() if name in params}
    options_type = getattr(cls, "options_type", None)
    if options_type is not None:
        kwargs["options"] = options_from(options_type, values)
    return cls(**kwargs)


def merged_specs(types: Iterable[type[Any]], reserved: Iterable[str] = ()) -> dict[str, OptionSpec]:
    """One :class:`OptionSpec` per key over the options classes ``types``; keys in ``reserved`` (the
    configuration's own fields) are left out. A key declared twice with another type or default is a ``TypeError``."""
    skip = set(reserved)
    merged: dict[str, OptionSpec] = {}
    for options_type in types:
        for spec in option_specs(options_type):
            if spec.key in skip:
                continue
            seen = merged.get(spec.key)
            if seen is None:
                merged[spec.key] = spec
            elif (seen.annotation, seen.default) != (spec.annotation, spec.default):
                raise TypeError(
                    f"option {spec.key!r}: {spec.owner} declares {spec.annotation!r} = {spec.default!r}, "
                    f"{seen.owner} declares {seen.annotation!r} = {seen.default!r}"
                )
    return merged
