"""RSA: server step on the sign of the model differences (Li et al., AAAI'19; spec §6.9, D25).

On the trainable parameters x_g = vec_P(θ_g), x_k = vec_P(θ_k), as the reference code does it:

    acc ← 0
    for k in clients, sorted by client id:   acc ← clip(acc + sign(x_g − x_k), −c, c)   (clip after every addition)
    x_g ← x_g − α · (λ · acc + λ_w · x_g)

The clip after each addition makes the result depend on the order of the clients, so clients are always visited
in ascending id order. ``rsa_update_bn_buffers = True`` (paper profile) sets the float BN buffers to the uniform
mean of the clients' buffers (integer counters likewise); ``False`` leaves every buffer at its global value
(the repo, which never updates them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from spmc.defenses._options import check_bool, check_real
from spmc.defenses.base import Aggregate, RoundInputs, finite_global, weighted_average
from spmc.options import option


def clipped_sign_sum(
    global_params: torch.Tensor,
    client_params: torch.Tensor,
    clip: float = 3.0,
    order: Sequence[int] | None = None,
) -> torch.Tensor:
    """acc after visiting the rows of ``client_params`` [n, m] (in ``order``, default row order), clipping to
    [−c, c] after each addition."""
    acc = torch.zeros_like(global_params)
    for i in range(client_params.shape[0]) if order is None else order:
        acc = (acc + torch.sign(global_params - client_params[i])).clamp_(-clip, clip)
    return acc


def rsa_step(
    global_params: torch.Tensor, acc: torch.Tensor, alpha: float = 0.05, lam: float = 0.1, wd: float = 0.001
) -> torch.Tensor:
    """x_g − α (λ · acc + λ_w · x_g), computed in float64, returned in the parameters' dtype."""
    x = global_params.to(torch.float64)
    return (x - alpha * (lam * acc.to(torch.float64) + wd * x)).to(global_params.dtype)


@dataclass(frozen=True)
class RSAOptions:
    """RSA's options (``rsa_*``; ``lam`` is ``rsa_lambda``)."""

    alpha: float = option(0.05, key="rsa_alpha", help="α, the server step size; > 0 (ALGORITHMS.md §6.9)")
    lam: float = option(0.1, key="rsa_lambda", help="λ, the weight of the clipped sign sum; >= 0 (ALGORITHMS.md §6.9)")
    wd: float = option(0.001, key="rsa_wd", help="λ_w, the server step's weight decay; >= 0 (ALGORITHMS.md §6.9)")
    clip: float = option(
        3.0, key="rsa_clip", help="the sign sum is clipped to ±clip after every addition; > 0 (ALGORITHMS.md §6.9)"
    )
    update_bn_buffers: bool = option(
        True,
        key="rsa_update_bn_buffers",
        help="global BN buffers = the clients' uniform mean (paper) or never updated (repo) (ALGORITHMS.md §6.9, D25)",
    )

    def __post_init__(self) -> None:
        check_real("rsa_alpha", self.alpha, gt=0.0)
        check_real("rsa_lambda", self.lam, ge=0.0)
        check_real("rsa_wd", self.wd, ge=0.0)
        check_real("rsa_clip", self.clip, gt=0.0)
        check_bool("rsa_update_bn_buffers", self.update_bn_buffers)


class RSA:
    """Sign-based server step with a saturating accumulator; no client weights."""

    name: ClassVar[str] = "rsa"
    description: ClassVar[str] = "RSA: server step on the clipped sum of signs of model differences (spec §6.9)"
    needs_server_data: ClassVar[bool] = False
    options_type: ClassVar[type[RSAOptions]] = RSAOptions

    def __init__(self, options: RSAOptions | None = None) -> None:
        self.options = options if options is not None else RSAOptions()

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        mask = inputs.layout.param_mask(inputs.client_states.device)
        order = sorted(range(inputs.n), key=lambda i: inputs.client_ids[i])
        x_g = inputs.global_state[mask]
        params = inputs.client_states if bool(mask.all()) else inputs.client_states[:, mask]
        acc = clipped_sign_sum(x_g, params, self.options.clip, order)
        if self.options.update_bn_buffers:
            uniform = torch.full((inputs.n,), 1.0 / inputs.n, dtype=torch.float64)
            new = weighted_average(inputs.client_states, uniform.to(inputs.client_states.device))
        else:
            new = inputs.global_state.clone()
        new[mask] = rsa_step(x_g, acc, self.options.alpha, self.options.lam, self.options.wd)
        return Aggregate(
            global_state=finite_global(new, self.name),
            weights=None,
            accepted=inputs.client_ids,
            diagnostics={
                "saturated_fraction": float((acc.abs() >= self.options.clip).to(torch.float64).mean())
                if acc.numel()
                else 0.0,
            },
        )
