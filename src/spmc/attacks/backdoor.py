"""Data-poisoning backdoors of spec §2.

* ``base`` (Table 2): 12 entries of channel 0, rows {0, 2} × columns {0, 1, 2, 4, 5, 6}, set to 1.0 in normalised
  space (``trigger_space = normalized``) or to raw intensity 1.0, i.e. (1 − mean_c)/std_c after Normalize
  (``pixel``); each training sample of a malicious client is poisoned with probability ρ and relabelled to τ_bd.
* ``semantic`` (spec §2.3, D35): class-3 images are poisoned with probability ρ: relabelled to τ_bd and given
  i.i.d. N(0, σ²) noise in normalised space.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spmc.threat import num_attackers

TRIGGER_ROWS: tuple[int, ...] = (0, 2)
TRIGGER_COLS: tuple[int, ...] = (0, 1, 2, 4, 5, 6)

ATTACKS: dict[str, str] = {
    "base": "pixel-pattern backdoor of Table 2: 12 trigger entries in channel 0, relabel to the target (spec §2.2)",
    "semantic": "semantic backdoor: noisy class-3 images relabelled to the target (spec §2.3)",
    "none": "no attack: every client is benign",
}


def malicious_ids(num_clients: int, gamma: float) -> tuple[int, ...]:
    """The last m = ⌊γK⌋ client ids (spec §2.1); γ = 0.2 → {8, 9}, γ = 0.3 → {7, 8, 9} for K = 10."""
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma: got {gamma}; must be in [0, 1)")
    m = num_attackers(gamma, num_clients)
    return tuple(range(num_clients - m, num_clients))


def trigger_values(
    space: str, mean: Sequence[float], std: Sequence[float], channels: Sequence[int] = (0,)
) -> dict[int, float]:
    """The value written into each trigger channel, in normalised space (spec §2.2, D13)."""
    if space == "normalized":
        return {c: 1.0 for c in channels}
    if space == "pixel":
        return {c: (1.0 - mean[c]) / std[c] for c in channels}
    raise ValueError(f"trigger_space: unknown value {space!r}; allowed: normalized, pixel")


def apply_trigger(x: torch.Tensor, values: dict[int, float], rows: torch.Tensor | None = None) -> torch.Tensor:
    """Write the trigger into the normalised batch ``x`` [B, 3, H, W] in place (only rows where ``rows`` is True)."""
    r = torch.tensor(TRIGGER_ROWS, device=x.device)
    c = torch.tensor(TRIGGER_COLS, device=x.device)
    for channel, value in values.items():
        patch = x[:, channel, r[:, None], c[None, :]]
        if rows is None:
            patch.fill_(value)
        else:
            patch[rows] = value
        x[:, channel, r[:, None], c[None, :]] = patch
    return x


def poison_mask(
    labels: torch.Tensor, rate: float, generator: torch.Generator, attack: str = "base", source_label: int = 3
) -> torch.Tensor:
    """Which samples get poisoned: u_i < ρ with u_i ~ U[0, 1) drawn for every index i (spec §2.2), restricted to the
    source class for the semantic attack (spec §2.3)."""
    u = torch.rand(labels.shape[0], generator=generator)
    mask = u < rate
    if attack == "semantic":
        mask &= labels.cpu() == source_label
    elif attack != "base":
        raise ValueError(f"attack: unknown value {attack!r}; allowed: {', '.join(ATTACKS)}")
    return mask.to(labels.device)


def poison_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    *,
    attack: str,
    values: dict[int, float],
    target: int,
    noise_std: float = 0.05,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Poison the rows of the normalised batch where ``mask`` is True: trigger (base) or noise (semantic)."""
    y = torch.where(mask, torch.full_like(y, target), y)
    if attack == "base":
        apply_trigger(x, values, rows=mask)
    elif attack == "semantic":
        noise = torch.randn(x.shape, generator=generator).to(x.device) * noise_std
        x = torch.where(mask[:, None, None, None], x + noise, x)
    else:
        raise ValueError(f"attack: unknown value {attack!r}; allowed: base, semantic")
    return x, y


def backdoor_test_set(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: str,
    values: dict[int, float],
    target: int,
    source_label: int = 3,
    noise_std: float = 0.05,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The triggered test set (spec §2.4): every test image triggered and labelled τ_bd (base), or every class-3
    image with noise (semantic). Returns images, labels, and a mask of rows whose true class is not τ_bd (for
    the ``asr_exclude_target_class`` variant, D14)."""
    if attack == "semantic":
        keep = y == source_label
        x, y = x[keep].clone(), y[keep]
        mask = torch.ones_like(y, dtype=torch.bool)
    else:
        x = x.clone()
        mask = torch.ones_like(y, dtype=torch.bool)
    not_target = y != target
    xb, yb = poison_batch(
        x, y, mask, attack=attack, values=values, target=target, noise_std=noise_std, generator=generator
    )
    return xb, yb, not_target
