"""Server-side defenses: one module per method, one registry line each (DESIGN.md "Registries")."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spmc.defenses.base import Aggregate, Defense, RoundInputs, weighted_average
from spmc.defenses.bulyan import Bulyan
from spmc.defenses.crfl import CRFL
from spmc.defenses.dnc import DnC
from spmc.defenses.fedavg import FedAvg, fedavg_weights
from spmc.defenses.fedcpa import FedCPA
from spmc.defenses.finetuning import Finetuning
from spmc.defenses.fltrust import FLTrust
from spmc.defenses.foolsgold import FoolsGold
from spmc.defenses.krum import Krum
from spmc.defenses.median import Median
from spmc.defenses.multikrum import MultiKrum
from spmc.defenses.rfa import RFA
from spmc.defenses.rlr import RLR
from spmc.defenses.rsa import RSA
from spmc.defenses.sageflow import Sageflow
from spmc.defenses.spmc import (
    SPMC,
    loo_cosine_scores,
    marginal_teachers,
    reference_cosine_scores,
    spmc_weights,
)
from spmc.defenses.trimmed_mean import TrimmedMean
from spmc.plugins import DEFENSE, load_entry_points

if TYPE_CHECKING:
    from spmc.config import Experiment

DEFENSES: dict[str, type[Defense]] = {
    "fedavg": FedAvg,
    "spmc": SPMC,
    "dnc": DnC,
    "sageflow": Sageflow,
    "bulyan": Bulyan,
    "rfa": RFA,
    "rlr": RLR,
    "crfl": CRFL,
    "foolsgold": FoolsGold,
    "rsa": RSA,
    "finetuning": Finetuning,
    "krum": Krum,
    "multikrum": MultiKrum,
    "trimmed_mean": TrimmedMean,
    "median": Median,
    "fltrust": FLTrust,
    "fedcpa": FedCPA,
}
load_entry_points("spmc.defenses", DEFENSES, DEFENSE)


def build_defense(cfg: Experiment) -> Defense:
    """The defense named by ``cfg.defense``, with its options taken from the configuration."""
    if cfg.defense not in DEFENSES:
        raise ValueError(f"defense: unknown value {cfg.defense!r}; allowed: {', '.join(sorted(DEFENSES))}")
    return DEFENSES[cfg.defense].from_config(cfg)


__all__ = [
    "DEFENSES",
    "SPMC",
    "Aggregate",
    "Defense",
    "FedAvg",
    "RoundInputs",
    "build_defense",
    "fedavg_weights",
    "loo_cosine_scores",
    "marginal_teachers",
    "reference_cosine_scores",
    "spmc_weights",
    "weighted_average",
]
