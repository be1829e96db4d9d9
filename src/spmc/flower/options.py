"""A Flower run configuration → spmc's :class:`~spmc.config.Experiment` plus the Flower-only options.

Keys of ``[tool.flwr.app.config]`` (and of ``flwr run --run-config``) are read as follows:

* ``preset`` and ``config-file`` pick a preset and an spmc TOML file, as ``spmc run --preset/--config`` do;
* any key that names an :class:`~spmc.config.Experiment` option (``defense``, ``client``, ``rounds``, ``gamma``,
  ``spmc_temperature``, ...; ``-`` may stand for ``_``) sets it, after the preset and the file (later wins);
  ``num-server-rounds`` is accepted for ``rounds``. The value ``""`` (:data:`UNSET`) sets nothing: an app declares
  its spmc options with it, so that only the keys a user sets override the preset (Flower hands the app its
  declared defaults and the user's keys merged, with no way to tell them apart);
* the keys of :data:`FLOWER_DEFAULTS` configure the Flower side (time-outs, run directory, resume).

Run-config values are TOML scalars, so a tuple option takes a JSON list in a string (``trigger_channels =
"[0, 1]"``) and an option whose default is None (``krum_f``) takes ``"none"``.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spmc.config import ConfigError, Experiment, make_experiment, resolve

UserValue = bool | float | int | str

FLOWER_DEFAULTS: dict[str, UserValue] = {
    "out-dir": "",
    "resume": True,
    "round-timeout": 600.0,
    "min-nodes": 0,
    "connect-timeout": 120.0,
    "identify-timeout": 30.0,
    "poll-interval": 0.2,
    "local-data": False,
}
"""Flower-only keys with their defaults: ``out-dir`` (run directory with ``config.json``, ``metrics.jsonl``,
``summary.json`` and ``checkpoint.pt``; empty = none), ``resume`` (continue from the checkpoint in ``out-dir``),
``round-timeout`` (seconds to wait for the replies of one round), ``min-nodes`` (nodes to wait for before the first
round; 0 = ``num_clients``), ``connect-timeout`` (longest wait for them), ``identify-timeout`` (wait for the
partition ids of nodes never seen before), ``poll-interval`` (seconds between two pulls of replies) and
``local-data`` (the nodes train on their own files, ``data-dir`` of their node config; the server loads only its own
test set, and the validation split of the defenses that need server data, from the run's ``data_dir``)."""

SOURCE_KEYS = ("preset", "config-file")
UNSET = ""
"""An spmc option's run-config value that sets nothing (the preset's, config file's or spmc's default stays)."""
ALIASES = {"num_server_rounds": "rounds"}


@dataclass(frozen=True)
class FlowerOptions:
    """The Flower side of a run (see :data:`FLOWER_DEFAULTS`)."""

    out_dir: str = ""
    resume: bool = True
    round_timeout: float = 600.0
    min_nodes: int = 0
    connect_timeout: float = 120.0
    identify_timeout: float = 30.0
    poll_interval: float = 0.2
    local_data: bool = False

    def __post_init__(self) -> None:
        for name in ("round_timeout", "connect_timeout", "identify_timeout", "poll_interval"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name.replace('_', '-')}: got {getattr(self, name)!r}; must be > 0")
        if self.min_nodes < 0:
            raise ConfigError(f"min-nodes: got {self.min_nodes!r}; must be >= 0")


def _is_optional(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def _is_tuple(annotation: Any) -> bool:
    return typing.get_origin(annotation) is tuple


def experiment_value(field: str, value: UserValue) -> Any:
    """A run-config scalar converted for the Experiment field ``field`` (JSON lists for tuples, "none" for None)."""
    annotation = Experiment.model_fields[field].annotation
    if isinstance(value, str):
        if _is_optional(annotation) and value.strip().lower() in ("none", "null", ""):
            return None
        if _is_tuple(annotation):
            try:
                return tuple(json.loads(value))
            except (json.JSONDecodeError, TypeError):
                raise ConfigError(f'{field}: got {value!r}; expected a JSON list such as "[0, 1]"') from None
    return value


def field_name(key: str) -> str | None:
    """The Experiment field a run-config key names, or None."""
    name = key.replace("-", "_")
    name = ALIASES.get(name, name)
    return name if name in Experiment.model_fields else None


def parse_run_config(
    run_config: Mapping[str, UserValue], overrides: Mapping[str, UserValue] | None = None
) -> tuple[Experiment, FlowerOptions]:
    """Split a Flower run configuration (then ``overrides``, later wins) into an Experiment and FlowerOptions.

    Unknown keys are refused with a message naming them and what is allowed.
    """
    values = {**run_config, **(overrides or {})}
    experiment: dict[str, Any] = {}
    flower: dict[str, Any] = dict(FLOWER_DEFAULTS)
    unknown = []
    for key, value in values.items():
        if key in SOURCE_KEYS:
            continue
        if key in FLOWER_DEFAULTS:
            flower[key] = value
        elif (field := field_name(key)) is not None:
            if not (isinstance(value, str) and value.strip() == UNSET):
                experiment[field] = experiment_value(field, value)
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(
            f"run config: unknown keys {sorted(unknown)}; allowed: {', '.join(SOURCE_KEYS)}, "
            f"{', '.join(FLOWER_DEFAULTS)} and the options of `spmc list --options`"
        )
    preset = str(values.get("preset", "")) or None
    file = str(values.get("config-file", "")) or None
    cfg = resolve(preset, file, **experiment)
    try:
        opts = FlowerOptions(
            out_dir=str(flower["out-dir"]),
            resume=flag("resume", flower["resume"]),
            round_timeout=float(flower["round-timeout"]),
            min_nodes=int(flower["min-nodes"]),
            connect_timeout=float(flower["connect-timeout"]),
            identify_timeout=float(flower["identify-timeout"]),
            poll_interval=float(flower["poll-interval"]),
            local_data=flag("local-data", flower["local-data"]),
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"run config: {err}") from None
    return cfg, opts


def flag(key: str, value: UserValue) -> bool:
    """A boolean run-config value (``true``/``false``, also as a string), or a ConfigError naming the key."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return text == "true"
    raise ConfigError(f"run config: {key} = {value!r}; expected true or false")


def with_num_clients(cfg: Experiment, num_clients: int) -> Experiment:
    """``cfg`` with ``num_clients`` replaced (validated again)."""
    if cfg.num_clients == num_clients:
        return cfg
    return make_experiment(**{**cfg.model_dump(), "num_clients": num_clients})
