"""Finetuning (server fine-tuning on proxy data; spec §6.10, D26).

θ̄ = (1/n) Σ_k θ_k over the whole state; θ̃ = θ̄ after ``finetune_epochs`` epochs of SGD on the server's clean
validation split (:meth:`ServerData.train`: train mode, lr/momentum/weight decay of spec §1.1, batch 64,
drop_last). With ``finetune_broadcast = False`` (the repo and the default) θ̄ is broadcast to the clients and θ̃ is
only evaluated (``Aggregate.eval_state``); with ``True`` θ̃ becomes the global model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from spmc.defenses._options import check_bool, check_int
from spmc.defenses._proxy import check_split_size, require_server_data
from spmc.defenses.base import Aggregate, RoundInputs, as_weight_list, weighted_average
from spmc.options import option


@dataclass(frozen=True)
class FinetuningOptions:
    """Fine-tuning's options: epochs on the server's data, and whether the tuned model is broadcast."""

    epochs: int = option(
        1, key="finetune_epochs", help="server epochs on its validation split; integer >= 0 (ALGORITHMS.md §6.10)"
    )
    broadcast: bool = option(
        False,
        key="finetune_broadcast",
        help="broadcast the fine-tuned model (the repo only evaluates it) (ALGORITHMS.md §6.10, D26)",
    )

    def __post_init__(self) -> None:
        check_int("finetune_epochs", self.epochs, 0)
        check_bool("finetune_broadcast", self.broadcast)


class Finetuning:
    """Uniform mean of the client states, fine-tuned on the server's clean data for evaluation (or broadcast)."""

    name: ClassVar[str] = "finetuning"
    description: ClassVar[str] = "Finetuning: uniform mean, then SGD on the server's clean data (spec §6.10)"
    needs_server_data: ClassVar[bool] = True
    options_type: ClassVar[type[FinetuningOptions]] = FinetuningOptions

    def __init__(self, options: FinetuningOptions | None = None) -> None:
        self.options = options if options is not None else FinetuningOptions()

    def check_server_data(self, samples: int, batch_size: int) -> None:
        """Raise unless fine-tuning (epochs > 0) has one full batch of server data (checked before a run starts)."""
        if self.options.epochs > 0:
            check_split_size(samples, batch_size, self.name)

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        n = inputs.n
        w = torch.full((n,), 1.0 / n, dtype=torch.float64)
        mean = weighted_average(inputs.client_states, w.to(inputs.client_states.device))
        if self.options.epochs > 0:
            data = require_server_data(inputs, self.name)
            tuned = data.train(mean, self.options.epochs, inputs.round).to(mean.device, mean.dtype)
        else:
            tuned = mean.clone()
        mask = inputs.layout.stat_mask(mean.device)
        shift = float((tuned[mask].to(torch.float64) - mean[mask].to(torch.float64)).norm())
        return Aggregate(
            global_state=tuned if self.options.broadcast else mean,
            weights=w,
            accepted=inputs.client_ids,
            diagnostics={
                "weights": as_weight_list(w, inputs.client_ids),
                "finetune_shift_norm": shift,
                "finetune_broadcast": self.options.broadcast,
            },
            eval_state=None if self.options.broadcast else tuned,
        )
