"""Flower integration (needs ``pip install "spmc[flower]"``): any spmc defense as a Flower strategy, SPMC's
client side as a ClientApp, server-side evaluation and resumable checkpoints. See ``docs/flower.md``.

Only this package imports ``flwr``; the rest of spmc stays framework-free.
"""

from spmc.flower.client_app import make_client_app
from spmc.flower.convert import MalformedUpdate, arrays_to_state, flatten_metrics, state_to_arrays
from spmc.flower.options import FLOWER_DEFAULTS, FlowerOptions, parse_run_config
from spmc.flower.server_app import ServerEvaluator, build_server, build_strategy, make_server_app, run_server
from spmc.flower.strategy import DefenseStrategy
from spmc.server import coalition_teachers

__all__ = [
    "FLOWER_DEFAULTS",
    "DefenseStrategy",
    "FlowerOptions",
    "MalformedUpdate",
    "ServerEvaluator",
    "arrays_to_state",
    "build_server",
    "build_strategy",
    "coalition_teachers",
    "flatten_metrics",
    "make_client_app",
    "make_server_app",
    "parse_run_config",
    "run_server",
    "state_to_arrays",
]
