"""FedAvg (spec §6.1, D11): θ_g ← Σ_k w_k θ_k over the whole state.

``fedavg_weighting = uniform`` gives w_k = 1/n (the repo's ``Equal``, Table 2's FedAvg);
``samples`` gives w_k = n_k / Σ_j n_j (McMahan et al. 2017).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import torch

from spmc.defenses._options import check_choice
from spmc.defenses.base import Aggregate, RoundInputs, as_weight_list, weighted_average
from spmc.options import option

Weighting = Literal["uniform", "samples"]


def fedavg_weights(num_samples: torch.Tensor, weighting: Weighting = "uniform") -> torch.Tensor:
    """w_k = 1/n (uniform) or n_k / Σ n_j (samples); falls back to uniform if every n_k is 0."""
    n = num_samples.shape[0]
    if weighting == "uniform":
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    if weighting == "samples":
        counts = num_samples.to(torch.float64)
        total = counts.sum()
        return counts / total if total > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)
    raise ValueError(f"fedavg_weighting: unknown value {weighting!r}; allowed: uniform, samples")


@dataclass(frozen=True)
class FedAvgOptions:
    """FedAvg's option: uniform weights or weights proportional to the clients' sample counts."""

    weighting: Weighting = option(
        "uniform",
        key="fedavg_weighting",
        help="client weights: uniform (1/n, Table 2's) or samples (n_k / Σ n_j) (ALGORITHMS.md §6.1, D11)",
    )

    def __post_init__(self) -> None:
        check_choice("fedavg_weighting", self.weighting, get_args(Weighting))


class FedAvg:
    """Plain federated averaging of the client states."""

    name: ClassVar[str] = "fedavg"
    description: ClassVar[str] = "FedAvg: (sample-)weighted mean of client states, no defense (spec §6.1)"
    needs_server_data: ClassVar[bool] = False
    options_type: ClassVar[type[FedAvgOptions]] = FedAvgOptions

    def __init__(self, options: FedAvgOptions | None = None) -> None:
        self.options = options if options is not None else FedAvgOptions()

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        w = fedavg_weights(inputs.num_samples, self.options.weighting)
        return Aggregate(
            global_state=weighted_average(inputs.client_states, w),
            weights=w,
            accepted=inputs.client_ids,
            diagnostics={"weights": as_weight_list(w, inputs.client_ids)},
        )
