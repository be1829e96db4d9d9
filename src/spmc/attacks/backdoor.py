"""Name-based helpers over the attack registry, kept for callers that name the attack by a string
(``malicious_ids``, ``poison_mask``, ``poison_batch``, ``backdoor_test_set``); the attacks themselves live in
:mod:`spmc.attacks.badnets` and :mod:`spmc.attacks.semantic`."""

from __future__ import annotations

import torch

from spmc.attacks.badnets import TRIGGER_COLS, TRIGGER_ROWS, apply_trigger, trigger_values
from spmc.attacks.base import Attack, AttackSettings, attacker_pool
from spmc.attacks.registry import ATTACKS

__all__ = [
    "TRIGGER_COLS",
    "TRIGGER_ROWS",
    "apply_trigger",
    "backdoor_test_set",
    "data_attack",
    "malicious_ids",
    "poison_batch",
    "poison_mask",
    "trigger_values",
]


def malicious_ids(num_clients: int, gamma: float) -> tuple[int, ...]:
    """The last m = ⌊γK⌋ client ids (spec §2.1); γ = 0.2 → {8, 9}, γ = 0.3 → {7, 8, 9} for K = 10."""
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma: got {gamma}; must be in [0, 1)")
    return attacker_pool(num_clients, gamma, "fixed", 0)


def data_attack(attack: str, settings: AttackSettings | None = None) -> Attack:
    """The registry's attack ``attack`` if it has a data hook, else a one-line ValueError."""
    cls = ATTACKS.get(attack)
    if cls is None or "data" not in cls.hooks:
        allowed = ", ".join(sorted(k for k, v in ATTACKS.items() if "data" in v.hooks))
        raise ValueError(f"attack: unknown value {attack!r}; allowed: {allowed}")
    return cls(settings)


def poison_mask(
    labels: torch.Tensor, rate: float, generator: torch.Generator, attack: str = "base", source_label: int = 3
) -> torch.Tensor:
    """Which samples get poisoned: u_i < ρ with u_i ~ U[0, 1) drawn for every index i (spec §2.2), restricted to the
    source class for the semantic attack (spec §2.3)."""
    return data_attack(attack, AttackSettings(source_label=source_label)).poison_mask(labels, rate, generator)


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
    settings = AttackSettings(target=target, values=tuple(values.items()), noise_std=noise_std)
    return data_attack(attack, settings).poison(x, y, mask, generator)


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
    settings = AttackSettings(target, tuple(values.items()), source_label, noise_std)
    return data_attack(attack, settings).test_set(x, y, generator)
