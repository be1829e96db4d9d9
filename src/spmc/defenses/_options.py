"""What the defenses' options dataclasses share: the ``exclude_int_buffers`` option and the value checks of their
``__post_init__``.

Each check raises a one-line ``ValueError`` naming the flat configuration key, the value and what is allowed, and
refuses at least what the configuration refuses for that key: a bool for a number, a non-finite float, an integer
outside a C int (the configuration's ``MAX_INT``), a value outside the range.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from spmc.options import option

#: The largest integer option (a C int), as in :data:`spmc.config.MAX_INT`.
MAX_INT = 2**31 - 1

EXCLUDE_INT_BUFFERS_HELP = (
    "leave integer counters (num_batches_tracked) out of vector statistics; the float buffers are kept "
    "(ALGORITHMS.md D31; repo profile: false)"
)


def exclude_int_buffers_option() -> Any:
    """The ``exclude_int_buffers`` field (a key of the configuration itself), declared alike by every defense."""
    return option(True, key="exclude_int_buffers", help=EXCLUDE_INT_BUFFERS_HELP)


def check_int(key: str, value: object, minimum: int, none: str = "") -> None:
    """``value`` is an integer in ``minimum`` … MAX_INT, or None where ``none`` says what None means."""
    if none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_INT:
        alt = f" (or None for {none})" if none else ""
        raise ValueError(f"{key}: got {value!r}; must be an integer {minimum} … {MAX_INT}{alt}")


def _finite(value: object) -> float | None:
    """``value`` as a finite float (an int is accepted, a bool is not), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        x = float(value)
    except OverflowError:
        return None
    return x if math.isfinite(x) else None


def check_real(
    key: str, value: object, *, gt: float | None = None, ge: float | None = None, le: float | None = None
) -> None:
    """``value`` is a finite number (an int is accepted, a bool is not) with ``value > gt``, ``>= ge``, ``<= le``."""
    x = _finite(value)
    ok = x is not None and (gt is None or x > gt) and (ge is None or x >= ge) and (le is None or x <= le)
    if not ok:
        bounds = [f"{op} {b}" for op, b in ((">", gt), (">=", ge), ("<=", le)) if b is not None]
        raise ValueError(f"{key}: got {value!r}; must be a finite number {' and '.join(bounds)}".rstrip())


def check_bool(key: str, value: object) -> None:
    """``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{key}: got {value!r}; must be true or false")


def check_choice(key: str, value: object, allowed: Iterable[str]) -> None:
    """``value`` is one of the strings ``allowed``."""
    choices = tuple(allowed)
    if not (isinstance(value, str) and value in choices):
        raise ValueError(f"{key}: unknown value {value!r}; allowed: {', '.join(choices)}")
