"""The attack registry: name → :class:`spmc.attacks.base.Attack` subclass (one file per attack, like the defenses).

Adding an attack: one new file with the formula and its source on top, one line here, its test, its doc row.
"""

from __future__ import annotations

from spmc.attacks.badnets import BadNets
from spmc.attacks.base import Attack, AttackKind, attack_kind
from spmc.attacks.constrain_scale import ConstrainScale
from spmc.attacks.neurotoxin import Neurotoxin
from spmc.attacks.none import NoAttack
from spmc.attacks.pgd import PGD
from spmc.attacks.semantic import Semantic

ATTACKS: dict[str, type[Attack]] = {
    "badnets": BadNets,
    "base": BadNets,  # the paper's name; an alias of badnets
    "semantic": Semantic,
    "none": NoAttack,
    "pgd": PGD,
    "constrain_scale": ConstrainScale,
    "neurotoxin": Neurotoxin,
}


def kind_of(attack: str, update_attack: str = "none") -> AttackKind:
    """:func:`spmc.attacks.base.attack_kind` of the registered attacks named ``attack`` and ``update_attack``
    (the configuration keys). Raises KeyError for a name the registry lacks (a plug-in not installed)."""
    return attack_kind(ATTACKS[attack], ATTACKS[update_attack])
