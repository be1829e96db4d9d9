"""RLR: robust learning rate (Ozdayi, Kantarcioglu, Gel, AAAI'21; spec §6.6, D2, D22).

On the trainable parameters only, with Δ_k = vec_P(θ_k) − vec_P(θ_g) and p_k = n_k / Σ_j n_j:

    s_j  = |Σ_k sign(Δ_k,j)|                     (sign(0) = 0)
    lr_j = +η_s if s_j ≥ θ_RLR else −η_s
    vec_P(θ_g) ← vec_P(θ_g) + lr ⊙ Σ_k p_k Δ_k

Every buffer (float BN statistics and integer counters) becomes the p-weighted mean of the clients' buffers. Updates
are matched to their clients' weights by client id (the repo's permuted keys are a bug, D2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from spmc.defenses._options import check_real
from spmc.defenses.base import Aggregate, RoundInputs, as_weight_list, finite_global, weighted_average
from spmc.defenses.fedavg import fedavg_weights
from spmc.options import option


def sign_agreement(updates: torch.Tensor) -> torch.Tensor:
    """s = |Σ_k sign(Δ_k)| per coordinate of ``updates`` [n, m] (sign(0) = 0), float32 [m]."""
    return torch.sign(updates).sum(dim=0).abs()


def robust_learning_rates(updates: torch.Tensor, threshold: float = 4.0, server_lr: float = 1.0) -> torch.Tensor:
    """lr_j = +η_s where the sign agreement reaches ``threshold``, −η_s elsewhere, float64 [m]."""
    agree = sign_agreement(updates) >= threshold
    lr = torch.full(agree.shape, -float(server_lr), dtype=torch.float64, device=updates.device)
    lr[agree] = float(server_lr)
    return lr


def rlr_aggregate(
    global_state: torch.Tensor,
    client_states: torch.Tensor,
    weights: torch.Tensor,
    param_mask: torch.Tensor,
    threshold: float = 4.0,
    server_lr: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New global state (parameters by the robust learning rate, buffers by the weighted mean) and the lr vector."""
    new = weighted_average(client_states, weights.to(client_states.device))
    g = global_state[param_mask]
    updates = client_states[:, param_mask].to(torch.float64) - g.to(torch.float64)
    lr = robust_learning_rates(updates, threshold, server_lr)
    step = weights.to(torch.float64).to(updates.device) @ updates
    new[param_mask] = (g.to(torch.float64) + lr * step).to(new.dtype)
    return new, lr


@dataclass(frozen=True)
class RLROptions:
    """RLR's options: the sign-agreement threshold θ and the server learning rate."""

    threshold: float = option(
        4.0,
        key="rlr_threshold",
        help="θ: coordinates whose sign agreement |Σ sign Δ_k| is below it get −η_s; >= 0 (ALGORITHMS.md §6.6, D22)",
    )
    server_lr: float = option(1.0, key="rlr_server_lr", help="η_s, the server learning rate; > 0 (ALGORITHMS.md §6.6)")

    def __post_init__(self) -> None:
        check_real("rlr_threshold", self.threshold, ge=0.0)
        check_real("rlr_server_lr", self.server_lr, gt=0.0)


class RLR:
    """Sign-agreement learning rate: coordinates without enough agreement are moved against the mean update."""

    name: ClassVar[str] = "rlr"
    description: ClassVar[str] = "RLR: per-coordinate server lr flipped where update signs disagree (spec §6.6)"
    needs_server_data: ClassVar[bool] = False
    options_type: ClassVar[type[RLROptions]] = RLROptions

    def __init__(self, options: RLROptions | None = None) -> None:
        self.options = options if options is not None else RLROptions()

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        p = fedavg_weights(inputs.num_samples, "samples")
        mask = inputs.layout.param_mask(inputs.client_states.device)
        new, lr = rlr_aggregate(
            inputs.global_state, inputs.client_states, p, mask, self.options.threshold, self.options.server_lr
        )
        return Aggregate(
            global_state=finite_global(new, self.name),
            weights=p,
            accepted=inputs.client_ids,
            diagnostics={
                "weights": as_weight_list(p, inputs.client_ids),
                "flipped_fraction": float((lr < 0).to(torch.float64).mean()) if lr.numel() else 0.0,
            },
        )
