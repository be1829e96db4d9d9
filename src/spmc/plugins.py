"""Plug-ins: third-party defenses, attacks, datasets and models found through Python entry points.

A package adds a method without forking spmc by declaring an entry point in one of four groups (docs/extending.md)::

    [project.entry-points."spmc.defenses"]
    my_defense = "my_package.my_defense:MyDefense"

At import, each registry (``DEFENSES``, ``ATTACKS``, ``DATASETS``, ``MODELS``) calls :func:`load_entry_points` on its
group once, after its built-in entries, so a plug-in shows in ``spmc list`` and works wherever a name is looked up
(``spmc run``, sweeps, Flower apps, configuration checks).

A plug-in that fails to import, points to an object of the wrong kind, has a malformed name, or whose name clashes
with an entry already registered (a built-in, or an earlier plug-in) is skipped with one warning that names the entry
point and its distribution; it never breaks spmc and never replaces a built-in. This guards against broken plug-ins,
not malicious ones: a plug-in is Python code that runs inside spmc with its rights.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from torch import nn

    from spmc.attacks.base import Attack
    from spmc.data.registry import DatasetInfo
    from spmc.defenses.base import Defense

__all__ = [
    "ATTACK",
    "DATASET",
    "DEFENSE",
    "GROUPS",
    "MODEL",
    "PLUGINS",
    "PluginKind",
    "load_entry_points",
    "plugin_origin",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The four entry-point groups, one per registry.
GROUPS: tuple[str, ...] = ("spmc.defenses", "spmc.attacks", "spmc.datasets", "spmc.models")

#: A registry name: lower case, starts with a letter or digit, at most 64 characters of ``a-z 0-9 _ . -``.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")

#: ``(group, name) -> distribution`` of every plug-in loaded so far (what ``spmc list`` marks as a plug-in).
PLUGINS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class PluginKind(Generic[T]):
    """What an entry point of one group must point to.

    ``convert(obj, name)`` returns the registry value for the object ``obj`` loaded for entry ``name``, or raises
    ``TypeError`` / ``ValueError`` with a one-line reason when ``obj`` is not of this kind; ``what`` names the kind.
    """

    what: str
    convert: Callable[[Any, str], T]


def _distribution(ep: EntryPoint) -> str:
    """The name of the distribution that declares ``ep`` (``unknown distribution`` when importlib has none)."""
    dist = getattr(ep, "dist", None)
    name = getattr(dist, "name", None) if dist is not None else None
    return f"distribution {name!r}" if isinstance(name, str) and name else "an unknown distribution"


def load_entry_points(group: str, registry: MutableMapping[str, T], kind: PluginKind[T]) -> list[str]:
    """Add every entry point of ``group`` to ``registry`` (names already there are kept); the names added, sorted.

    Each entry point is loaded (its module imported), checked by ``kind.convert`` and registered under its own name.
    Every failure is logged as one warning naming the entry point and its distribution, and the entry point skipped.
    """
    added: list[str] = []
    try:
        found = sorted(entry_points(group=group), key=lambda ep: (ep.name, ep.value))
    except Exception as err:  # a malformed dist-info on sys.path must not break spmc
        logger.warning("plug-ins of group %s: could not list entry points (%s); none loaded", group, err)
        return added
    for ep in found:
        where = f"plug-in {ep.name!r} = {ep.value!r} of group {group} from {_distribution(ep)}"
        if not NAME_PATTERN.fullmatch(ep.name):
            logger.warning("%s skipped: the name must match %s", where, NAME_PATTERN.pattern)
            continue
        if ep.name in registry:
            origin = PLUGINS.get((group, ep.name))
            owner = f"the plug-in from {origin}" if origin else "a built-in"
            logger.warning("%s skipped: the name %r is already taken by %s", where, ep.name, owner)
            continue
        try:
            obj = ep.load()
        except (Exception, SystemExit) as err:
            logger.warning("%s skipped: it failed to load: %s: %s", where, type(err).__name__, err)
            continue
        try:
            value = kind.convert(obj, ep.name)
        except (TypeError, ValueError) as err:
            logger.warning("%s skipped: it is not %s: %s", where, kind.what, err)
            continue
        registry[ep.name] = value
        PLUGINS[(group, ep.name)] = _distribution(ep)
        added.append(ep.name)
        logger.debug("loaded %s", where)
    return added


def plugin_origin(group: str, name: str) -> str | None:
    """The distribution that registered ``name`` in ``group`` (``None`` for a built-in or an unknown name)."""
    return PLUGINS.get((group, name))


def protocol_members(protocol: type) -> tuple[str, ...]:
    """The public attributes and methods a ``typing.Protocol`` declares: its annotations and functions."""
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {k for k, v in vars(protocol).items() if callable(v) or isinstance(v, (classmethod, staticmethod))}
    return tuple(sorted(n for n in names if not n.startswith("_")))


def _defense(obj: Any, name: str) -> type[Defense]:
    """A class with every member of :class:`spmc.defenses.base.Defense` and a ``description`` string."""
    from spmc.defenses.base import Defense as Protocol

    if not isinstance(obj, type):
        raise TypeError(f"got {type(obj).__name__}, expected a class")
    missing = [m for m in protocol_members(Protocol) if not hasattr(obj, m)]
    if missing:
        raise TypeError(f"class {obj.__qualname__} lacks {', '.join(missing)}")
    if not isinstance(getattr(obj, "description", None), str):
        raise TypeError(f"{obj.__qualname__}.description must be a string")
    return obj


def _attack(obj: Any, name: str) -> type[Attack]:
    """A subclass of :class:`spmc.attacks.base.Attack` with a ``description`` string and ``hooks`` a subset of
    data, training, crafting."""
    from spmc.attacks.base import HOOKS
    from spmc.attacks.base import Attack as Base

    if not isinstance(obj, type) or not issubclass(obj, Base):
        what = getattr(obj, "__qualname__", type(obj).__name__)
        raise TypeError(f"got {what}, expected a subclass of spmc.attacks.Attack")
    if not isinstance(getattr(obj, "description", None), str):
        raise TypeError(f"{obj.__qualname__}.description must be a string")
    hooks = getattr(obj, "hooks", None)
    if not isinstance(hooks, frozenset) or not hooks <= set(HOOKS):
        raise TypeError(f"{obj.__qualname__}.hooks must be a frozenset of {', '.join(HOOKS)}; got {hooks!r}")
    return obj


def _dataset(obj: Any, name: str) -> DatasetInfo:
    """A :class:`spmc.data.registry.DatasetInfo` whose ``name`` is the entry point's name."""
    from spmc.data.registry import DatasetInfo as Info

    if not isinstance(obj, Info):
        raise TypeError(f"got {type(obj).__name__}, expected a DatasetInfo")
    if obj.name != name:
        raise ValueError(f"its DatasetInfo.name is {obj.name!r}, not the entry point's name {name!r}")
    return obj


def _model(obj: Any, name: str) -> Callable[[int], nn.Module]:
    """A callable ``factory(num_classes) -> torch.nn.Module`` (a module class or a function)."""
    if not callable(obj):
        raise TypeError(f"got {type(obj).__name__}, expected a callable factory(num_classes) -> nn.Module")
    factory: Callable[[int], nn.Module] = obj
    return factory


#: What each group's entry points point to.
DEFENSE: PluginKind[type[Defense]] = PluginKind("a defense class (spmc.defenses.base.Defense)", _defense)
ATTACK: PluginKind[type[Attack]] = PluginKind("an attack class (spmc.attacks.Attack)", _attack)
DATASET: PluginKind[DatasetInfo] = PluginKind("a DatasetInfo", _dataset)
MODEL: PluginKind[Callable[[int], nn.Module]] = PluginKind("a model factory", _model)
