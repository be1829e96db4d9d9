"""Attacks (spec ATTACKS.md): the registry ``ATTACKS`` of :class:`Attack` classes with the three hooks of §A2
(data, training, crafting), the threat model's schedule and attacker pool (§A1)."""

from spmc.attacks.backdoor import (
    TRIGGER_COLS,
    TRIGGER_ROWS,
    apply_trigger,
    backdoor_test_set,
    malicious_ids,
    poison_mask,
    trigger_values,
)
from spmc.attacks.base import (
    HOOKS,
    Attack,
    AttackContext,
    AttackPlan,
    AttackSchedule,
    AttackSettings,
    Crafter,
    CraftingInputs,
    TrainingHooks,
    attacker_pool,
)
from spmc.attacks.registry import ATTACKS
from spmc.plugins import ATTACK, load_entry_points

load_entry_points("spmc.attacks", ATTACKS, ATTACK)

__all__ = [
    "ATTACKS",
    "HOOKS",
    "TRIGGER_COLS",
    "TRIGGER_ROWS",
    "Attack",
    "AttackContext",
    "AttackPlan",
    "AttackSchedule",
    "AttackSettings",
    "Crafter",
    "CraftingInputs",
    "TrainingHooks",
    "apply_trigger",
    "attacker_pool",
    "backdoor_test_set",
    "malicious_ids",
    "poison_mask",
    "trigger_values",
]
