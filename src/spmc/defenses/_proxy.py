"""Shared check for the defenses that read the server's clean data (Sageflow, FLTrust, Finetuning; spec §5, D38)."""

from __future__ import annotations

from spmc.defenses.base import RoundInputs
from spmc.defenses.server_data import ServerData


def require_server_data(inputs: RoundInputs, method: str) -> ServerData:
    """``inputs.server_data``, checked to hold at least one full batch (batches drop the last partial one, §1.1)."""
    data = inputs.server_data
    if data is None:
        raise ValueError(f"defense {method!r} needs the server's validation data, but the round carries none")
    check_split_size(len(data), data.batch_size, method)
    return data


def check_split_size(samples: int, batch_size: int, method: str) -> None:
    """Raise unless the server's validation split holds at least one full batch (``samples >= batch_size``)."""
    if samples < batch_size:
        raise ValueError(
            f"val_fraction: the server validation split has {samples} samples, fewer than one batch of "
            f"batch_size = {batch_size}; defense {method!r} needs at least one full batch"
        )
