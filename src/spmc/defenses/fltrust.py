"""FLTrust (Cao et al., NDSS'21; spec §6.11 [REC]): trust scores against a server update on clean data.

The server trains a copy of θ_g for ``fltrust_public_epochs`` epochs on its validation split
(:meth:`ServerData.train`), giving Δ_0 = θ_0 − θ_g over the whole state. With cos and ‖·‖ over the stat entries
(integer counters left out, spec D31; ``exclude_int_buffers = False`` keeps them, the repo profile):

    TS_k = max(cos(Δ_k, Δ_0), 0) · ‖Δ_0‖ / (‖Δ_k‖ + 1e−5)
    θ_g ← θ_g + Σ_k TS_k Δ_k / (Σ_k TS_k + 1e−5)        over the whole state

(the repo's ``per_client`` rule: the norm ratio is part of TS_k and the sum is normalised by Σ TS_k, so the step is a
weighted mean of the Δ_k with weights ∝ ReLU-cos_k / ‖Δ_k‖). The reported weights are TS_k / Σ_j TS_j; when every
TS_k is 0 the global model is unchanged, no weights are reported and no client is accepted.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from spmc.defenses._options import check_bool, check_int, exclude_int_buffers_option
from spmc.defenses._proxy import check_split_size, require_server_data
from spmc.defenses.base import Aggregate, RoundInputs, as_weight_list, finite_global, stat_mask
from spmc.defenses.linalg import column_slices
from spmc.options import option

log = logging.getLogger(__name__)

EPS = 1e-5
_BLOCK = 1 << 18


def _update_block(client_states: torch.Tensor, global_state: torch.Tensor, cols: slice) -> torch.Tensor:
    return client_states[:, cols].to(torch.float64) - global_state[cols].to(torch.float64)


def cosines_and_norms(
    client_states: torch.Tensor,
    global_state: torch.Tensor,
    server_update: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """cos(Δ_k, Δ_0), ‖Δ_k‖ and ‖Δ_0‖ over the entries in ``mask`` (all if None), Δ_k = θ_k − θ_g.

    Accumulated in float64 over column blocks (no [n, d] float64 copy); cos is 0 where either norm is 0.
    Returns float64 CPU tensors [n], [n] and a float.
    """
    n, d = client_states.shape
    dev = client_states.device
    dots = torch.zeros(n, dtype=torch.float64, device=dev)
    sq = torch.zeros(n, dtype=torch.float64, device=dev)
    ref_sq = torch.zeros((), dtype=torch.float64, device=dev)
    for cols in column_slices(d, _BLOCK):
        upd = _update_block(client_states, global_state, cols)
        ref = server_update[cols].to(torch.float64)
        if mask is not None:
            keep = mask[cols]
            upd, ref = upd[:, keep], ref[keep]
        dots += upd @ ref
        sq += (upd * upd).sum(dim=1)
        ref_sq += ref @ ref
    norms, ref_norm = sq.sqrt().cpu(), float(ref_sq.sqrt())
    denom = norms * ref_norm
    cos = torch.where(denom > 0, dots.cpu() / torch.where(denom > 0, denom, torch.ones_like(denom)), 0.0)
    return cos, norms, ref_norm


def fltrust_trust_scores(
    cosines: torch.Tensor, norms: torch.Tensor, server_norm: float, eps: float = EPS
) -> torch.Tensor:
    """TS_k = max(cos_k, 0) · ‖Δ_0‖ / (‖Δ_k‖ + eps), float64 [n] (spec §6.11)."""
    return cosines.to(torch.float64).clamp_min(0.0) * server_norm / (norms.to(torch.float64) + eps)


def fltrust_apply(
    global_state: torch.Tensor, client_states: torch.Tensor, trust: torch.Tensor, eps: float = EPS
) -> torch.Tensor:
    """θ_g + Σ_k TS_k Δ_k / (Σ_k TS_k + eps) over the whole state, in float64, returned in the states' dtype."""
    coeff = (trust.to(torch.float64) / (float(trust.sum()) + eps)).to(client_states.device)
    out = torch.empty_like(global_state)
    for cols in column_slices(global_state.shape[0], _BLOCK):
        step = coeff @ _update_block(client_states, global_state, cols)
        out[cols] = (global_state[cols].to(torch.float64) + step).to(out.dtype)
    return out


@dataclass(frozen=True)
class FLTrustOptions:
    """FLTrust's options: the server's epochs on its clean data, integer counters left out."""

    public_epochs: int = option(
        10,
        key="fltrust_public_epochs",
        help="server epochs on its clean data for the reference update; integer >= 1 (ALGORITHMS.md §6.11)",
    )
    exclude_int_buffers: bool = exclude_int_buffers_option()

    def __post_init__(self) -> None:
        check_int("fltrust_public_epochs", self.public_epochs, 1)
        check_bool("exclude_int_buffers", self.exclude_int_buffers)


class FLTrust:
    """Trust-weighted mean of the client updates, trust from the cosine to the server's own update."""

    name: ClassVar[str] = "fltrust"
    description: ClassVar[str] = "FLTrust: ReLU-cosine trust against a server update on clean data (spec §6.11)"
    needs_server_data: ClassVar[bool] = True
    options_type: ClassVar[type[FLTrustOptions]] = FLTrustOptions

    def __init__(self, options: FLTrustOptions | None = None) -> None:
        self.options = options if options is not None else FLTrustOptions()

    def check_server_data(self, samples: int, batch_size: int) -> None:
        """Raise unless the server's validation split holds one full batch (checked before a run starts)."""
        check_split_size(samples, batch_size, self.name)

    def server_update(self, inputs: RoundInputs) -> torch.Tensor:
        """Δ_0 = train(θ_g, public_epochs) − θ_g on the server's validation split."""
        data = require_server_data(inputs, self.name)
        trained = data.train(inputs.global_state, self.options.public_epochs, inputs.round)
        return trained.to(inputs.global_state.device) - inputs.global_state

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        delta0 = self.server_update(inputs)
        mask = stat_mask(inputs.layout, self.options.exclude_int_buffers, inputs.client_states.device)
        cos, norms, ref_norm = cosines_and_norms(inputs.client_states, inputs.global_state, delta0, mask)
        if not (bool(torch.isfinite(norms).all()) and math.isfinite(ref_norm)):
            raise ValueError(
                f"fltrust: the update norms overflow float64 (clients {list(inputs.client_ids)}, server "
                f"{ref_norm}); every update norm must be finite"
            )
        trust = fltrust_trust_scores(cos, norms, ref_norm)
        ids = inputs.client_ids
        total = float(trust.sum())
        weights = trust / total if total > 0 else None
        if weights is None:
            log.warning("round %d: FLTrust trusts no client (every cosine <= 0); global model unchanged", inputs.round)
        accepted = tuple(cid for cid, ts in zip(ids, trust.tolist()) if ts > 0)
        diagnostics = {
            "cosines": as_weight_list(cos, ids),
            "trust_scores": as_weight_list(trust, ids),
            "server_update_norm": ref_norm,
            "removed": [cid for cid in ids if cid not in accepted],
        }
        if weights is not None:
            diagnostics["weights"] = as_weight_list(weights, ids)
        return Aggregate(
            global_state=finite_global(fltrust_apply(inputs.global_state, inputs.client_states, trust), self.name),
            weights=weights,
            accepted=accepted,
            diagnostics=diagnostics,
        )
