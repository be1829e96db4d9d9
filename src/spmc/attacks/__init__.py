"""Attacks: the paper's pixel-pattern backdoor and the semantic backdoor (spec §2)."""

from spmc.attacks.backdoor import (
    ATTACKS,
    TRIGGER_COLS,
    TRIGGER_ROWS,
    apply_trigger,
    backdoor_test_set,
    malicious_ids,
    poison_mask,
    trigger_values,
)
from spmc.plugins import ATTACK, load_entry_points

load_entry_points("spmc.attacks", ATTACKS, ATTACK)

__all__ = [
    "ATTACKS",
    "TRIGGER_COLS",
    "TRIGGER_ROWS",
    "apply_trigger",
    "backdoor_test_set",
    "malicious_ids",
    "poison_mask",
    "trigger_values",
]
