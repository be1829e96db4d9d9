"""OpenMP's wait policy, chosen before torch loads its OpenMP runtime (``libgomp`` reads it once, at load).

By default GNU OpenMP threads *spin* at every barrier. When another CPU-bound process shares the cores, a spinning
thread burns the time slice its partner needs, and torch's intra-op threads (and the native kernel, which runs on
them) slow down by one to two orders of magnitude: on a 2-core AMD EPYC, the demo preset took 22 s per round with
2 threads beside one other busy process, 0.66 s with ``OMP_WAIT_POLICY=PASSIVE`` and 0.42 s with spinning on an
idle machine (docs/performance.md, "Threads on a busy CPU"). So, when the CPU is already busy as spmc is imported —
another task is runnable (``/proc/loadavg``, the median of :data:`SAMPLES` readings), or, where the system has no
``/proc``, the 1-minute load average is at least :data:`BUSY_LOAD` — and the user has set neither
``OMP_WAIT_POLICY`` nor ``GOMP_SPINCOUNT``, threads wait passively (1.4× slower on an idle CPU for that small
preset, so an idle CPU keeps the default). Passive waiting changes no result: the work is split the same way.

Effective only where spmc is imported before torch (``spmc`` on the command line, a sweep's runs, Flower's apps);
a program that imports torch first keeps whatever policy torch started with.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

#: Without ``/proc/loadavg``: the 1-minute load average from which the CPU counts as busy.
BUSY_LOAD = 1.0
#: Readings of ``/proc/loadavg``'s runnable count, :data:`SAMPLE_GAP_S` apart (a momentary task is not load).
SAMPLES = 5
SAMPLE_GAP_S = 0.002
#: The variables that, when set by the user, leave the policy to them.
USER_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def runnable_others(loadavg_text: str) -> int:
    """Tasks runnable right now besides the reader, from ``/proc/loadavg`` ("0.52 0.58 0.59 3/251 1234")."""
    running = loadavg_text.split()[3].split("/")[0]
    return max(int(running) - 1, 0)


def wait_policy(env: MutableMapping[str, str], load: float, others: int | None) -> str | None:
    """``"PASSIVE"`` when the CPU is busy and ``env`` sets no wait policy of its own; ``None`` (leave OpenMP's
    default) otherwise. Busy: ``others`` (other runnable tasks) > 0; where that is unknown (``None``), ``load``
    (1-minute average) >= :data:`BUSY_LOAD`."""
    if any(key in env for key in USER_KEYS):
        return None
    busy = others > 0 if others is not None else load >= BUSY_LOAD
    return "PASSIVE" if busy else None


def _others_now() -> int | None:
    """The median of :data:`SAMPLES` readings of the other runnable tasks; ``None`` without ``/proc/loadavg``."""
    readings = []
    try:
        for i in range(SAMPLES):
            if i:
                time.sleep(SAMPLE_GAP_S)
            with open("/proc/loadavg", encoding="ascii") as fh:
                readings.append(runnable_others(fh.read()))
    except (OSError, ValueError, IndexError):
        return None
    return sorted(readings)[len(readings) // 2]


def _load_now() -> tuple[float, int | None]:
    """The 1-minute load average (0 where the system does not say) and the other runnable tasks."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return load, _others_now()


def apply(env: MutableMapping[str, str] = os.environ) -> str | None:
    """Set ``OMP_WAIT_POLICY`` in ``env`` if :func:`wait_policy` says so; the value set, or ``None``."""
    load, others = _load_now()
    policy = wait_policy(env, load, others)
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
        log.debug("busy CPU (load %.2f, %s other runnable): OMP_WAIT_POLICY=%s", load, others, policy)
    return policy


#: What :func:`apply` chose when spmc was imported (``None``: OpenMP's default, or the user's own setting).
CHOSEN = apply()
