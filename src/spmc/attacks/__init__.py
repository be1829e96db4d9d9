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
    ATTACK_KINDS,
    HOOKS,
    Attack,
    AttackKind,
    AttackPlan,
    AttackSchedule,
    AttackSettings,
    Crafter,
    CraftingInputs,
    TrainingHooks,
    attack_kind,
    attacker_pool,
)
from spmc.attacks.registry import ATTACKS, kind_of
from spmc.plugins import ATTACK, load_entry_points

load_entry_points("spmc.attacks", ATTACKS, ATTACK)

__all__ = [
    "ATTACKS",
    "ATTACK_KINDS",
    "HOOKS",
    "TRIGGER_COLS",
    "TRIGGER_ROWS",
    "Attack",
    "AttackKind",
    "AttackPlan",
    "AttackSchedule",
    "AttackSettings",
    "Crafter",
    "CraftingInputs",
    "TrainingHooks",
    "apply_trigger",
    "attack_kind",
    "attacker_pool",
    "backdoor_test_set",
    "kind_of",
    "malicious_ids",
    "poison_mask",
    "trigger_values",
]
