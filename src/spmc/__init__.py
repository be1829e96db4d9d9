"""spmc: SPMC (He et al., ICML 2025) and rival federated backdoor defenses.

Public API (see docs/usage.md): the defense registry and interface, the SPMC functions on plain tensors, the
configuration, and the simulation entry point.
"""

from spmc import _omp  # noqa: F401  (first: chooses OpenMP's wait policy before torch loads)
from spmc.config import ConfigError, Experiment, build_defense, make_experiment, resolve
from spmc.defenses import (
    DEFENSES,
    SPMC,
    Aggregate,
    Defense,
    FedAvg,
    RoundInputs,
    loo_cosine_scores,
    marginal_teachers,
    spmc_weights,
    weighted_average,
)
from spmc.params import ParamLayout
from spmc.purify import distillation_loss, project_conflicting
from spmc.simulation import RunResult, Simulation, run_experiment

__version__ = "0.1.0"

__all__ = [
    "DEFENSES",
    "SPMC",
    "Aggregate",
    "ConfigError",
    "Defense",
    "Experiment",
    "FedAvg",
    "ParamLayout",
    "RoundInputs",
    "RunResult",
    "Simulation",
    "build_defense",
    "distillation_loss",
    "loo_cosine_scores",
    "make_experiment",
    "marginal_teachers",
    "project_conflicting",
    "resolve",
    "run_experiment",
    "spmc_weights",
    "weighted_average",
]
