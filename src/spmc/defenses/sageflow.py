"""Sageflow (Park et al., NeurIPS'21; spec §6.3, D19 [REC]): entropy filter and loss-weighted averaging.

Every received local model θ_k is evaluated in eval mode on the server's clean validation split, giving the mean
batch loss ℓ_k and the mean batch prediction entropy H_k (:meth:`ServerData.loss_and_entropy`). Then

    a_k = 𝟙[H_k < E_th] / ℓ_k^δ        (× n_k when ``sageflow_size_weight``)
    α_k = a_k / Σ_j a_j,               θ_g ← Σ_k α_k θ_k over the whole state.

Clients with H_k ≥ E_th (or a non-finite loss or entropy) are removed. If every client is removed, or the kept
clients' a_k sum to zero, the weights fall back to uniform over all clients. Unlike the reference code, each *local*
model is evaluated (the repo evaluates the previous global model for everyone, D19) and no 1e−5 is added to a_k, so a
removed client really gets weight 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from spmc.defenses._options import check_bool, check_real
from spmc.defenses._proxy import check_split_size, require_server_data
from spmc.defenses.base import Aggregate, RoundInputs, as_weight_list, weighted_average
from spmc.options import option

log = logging.getLogger(__name__)

_MIN_LOSS = 1e-12


def sageflow_kept(losses: torch.Tensor, entropies: torch.Tensor, eth: float = 2.0) -> torch.Tensor:
    """Bool [n]: H_k < eth with a finite loss and entropy (the entropy filter of spec §6.3)."""
    ell = losses.to(torch.float64).cpu()
    ent = entropies.to(torch.float64).cpu()
    if ell.dim() != 1 or ent.shape != ell.shape:
        raise ValueError(f"losses and entropies must both be [n]; got {tuple(ell.shape)} and {tuple(ent.shape)}")
    return torch.isfinite(ell) & torch.isfinite(ent) & (ent < eth)


def sageflow_weights(
    losses: torch.Tensor,
    entropies: torch.Tensor,
    eth: float = 2.0,
    delta: float = 1.0,
    num_samples: torch.Tensor | None = None,
) -> tuple[torch.Tensor, bool]:
    """α and whether the uniform fallback was used (spec §6.3 [REC]); α is float64 [n] on the CPU.

    a_k = 𝟙[k kept] · ℓ_k^{−δ} (· n_k if ``num_samples`` is given), kept as in :func:`sageflow_kept`;
    α = a / Σ a. A loss of 0 is read as 1e−12 so that it gets the largest weight. With no kept client, or
    Σ a = 0, α = 1/n for every client.
    """
    kept = sageflow_kept(losses, entropies, eth)
    n = kept.shape[0]
    ell = losses.to(torch.float64).cpu()
    a = torch.zeros(n, dtype=torch.float64)
    a[kept] = ell[kept].clamp_min(_MIN_LOSS).pow(-delta)
    if num_samples is not None:
        a = a * num_samples.to(torch.float64).cpu()
    total = a.sum()
    if not bool(kept.any()) or not bool(torch.isfinite(total)) or float(total) <= 0.0:
        return torch.full((n,), 1.0 / n, dtype=torch.float64), True
    return a / total, False


@dataclass(frozen=True)
class SageflowOptions:
    """Sageflow's options: the entropy threshold, the loss exponent δ, and optional sample-size weighting."""

    eth: float = option(
        2.0,
        key="sageflow_eth",
        help="E_th: drop models whose mean prediction entropy (nats; at most ln C) is >= it; > 0 (ALGORITHMS.md §6.3)",
    )
    delta: float = option(
        1.0, key="sageflow_delta", help="loss exponent δ of the weights ∝ ℓ_k^−δ; >= 0 (ALGORITHMS.md §6.3)"
    )
    size_weight: bool = option(
        False,
        key="sageflow_size_weight",
        help="also weight by the sample count n_k (the original's; the repo has none) (ALGORITHMS.md §6.3, D19)",
    )

    def __post_init__(self) -> None:
        check_real("sageflow_eth", self.eth, gt=0.0)
        check_real("sageflow_delta", self.delta, ge=0.0)
        check_bool("sageflow_size_weight", self.size_weight)


class Sageflow:
    """Entropy-filtered, inverse-loss-weighted averaging of the local models on the server's clean data."""

    name: ClassVar[str] = "sageflow"
    description: ClassVar[str] = "Sageflow: drop high-entropy local models, weight the rest by 1/loss^delta (spec §6.3)"
    needs_server_data: ClassVar[bool] = True
    options_type: ClassVar[type[SageflowOptions]] = SageflowOptions

    def __init__(self, options: SageflowOptions | None = None) -> None:
        self.options = options if options is not None else SageflowOptions()

    def check_server_data(self, samples: int, batch_size: int) -> None:
        """Raise unless the server's validation split holds one full batch (checked before a run starts)."""
        check_split_size(samples, batch_size, self.name)

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        data = require_server_data(inputs, self.name)
        pairs = [data.loss_and_entropy(state, inputs.round) for state in inputs.client_states]
        losses = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
        entropies = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
        w, fallback = sageflow_weights(
            losses,
            entropies,
            self.options.eth,
            self.options.delta,
            inputs.num_samples if self.options.size_weight else None,
        )
        if fallback:
            log.warning(
                "round %d: Sageflow kept no client (entropy >= %g); uniform weights", inputs.round, self.options.eth
            )
        ids = inputs.client_ids
        kept = sageflow_kept(losses, entropies, self.options.eth).tolist()
        accepted = tuple(cid for cid, wk in zip(ids, w.tolist()) if wk > 0)
        return Aggregate(
            global_state=weighted_average(inputs.client_states, w.to(inputs.client_states.device)),
            weights=w,
            accepted=accepted,
            diagnostics={
                "losses": as_weight_list(losses, ids),
                "entropies": as_weight_list(entropies, ids),
                "weights": as_weight_list(w, ids),
                "removed": [cid for cid in ids if cid not in accepted],
                "entropy_filtered": [cid for cid, ok in zip(ids, kept) if not ok],
                "uniform_fallback": fallback,
            },
        )
