"""The attack registry: name → :class:`spmc.attacks.base.Attack` subclass (one file per attack, like the defenses).

Adding an attack: one new file with the formula and its source on top, one line here, its test, its doc row.
"""

from __future__ import annotations

from spmc.attacks.a3fl import A3FL
from spmc.attacks.badnets import BadNets
from spmc.attacks.base import Attack, AttackKind, attack_kind
from spmc.attacks.blended import Blended
from spmc.attacks.coalition_mimic import CoalitionMimic
from spmc.attacks.constrain_scale import ConstrainScale
from spmc.attacks.dba import DBA
from spmc.attacks.defense_aware import DefenseAware
from spmc.attacks.gaussian import Gaussian
from spmc.attacks.ipm import Ipm
from spmc.attacks.label_flip import LabelFlip
from spmc.attacks.lie import Lie
from spmc.attacks.min_max import MinMax
from spmc.attacks.min_sum import MinSum
from spmc.attacks.neurotoxin import Neurotoxin
from spmc.attacks.none import NoAttack
from spmc.attacks.pgd import PGD
from spmc.attacks.scaling import Scaling
from spmc.attacks.semantic import Semantic
from spmc.attacks.sign_flip import SignFlip
from spmc.attacks.spmc_skip import SpmcSkip

ATTACKS: dict[str, type[Attack]] = {
    "badnets": BadNets,
    "base": BadNets,  # the paper's name; an alias of badnets
    "semantic": Semantic,
    "blended": Blended,
    "dba": DBA,
    "label_flip": LabelFlip,
    "a3fl": A3FL,
    "none": NoAttack,
    # update (crafting) attacks, ATTACKS.md §A4
    "scaling": Scaling,
    "lie": Lie,
    "min_max": MinMax,
    "min_sum": MinSum,
    "ipm": Ipm,
    "sign_flip": SignFlip,
    "gaussian": Gaussian,
    "pgd": PGD,
    "constrain_scale": ConstrainScale,
    "neurotoxin": Neurotoxin,
    # adaptive attacks (the attacker knows the defense), ATTACKS.md §A5
    "spmc_skip": SpmcSkip,
    "coalition_mimic": CoalitionMimic,
    "defense_aware": DefenseAware,
}


def kind_of(attack: str, update_attack: str = "none") -> AttackKind:
    """:func:`spmc.attacks.base.attack_kind` of the registered attacks named ``attack`` and ``update_attack``
    (the configuration keys). Raises KeyError for a name the registry lacks (a plug-in not installed)."""
    return attack_kind(ATTACKS[attack], ATTACKS[update_attack])
