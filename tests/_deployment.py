"""A real 127.0.0.1 Flower deployment for a test: started, then stopped by its PIDs, with a check that every
process group it started is gone (no SuperLink, SuperNode, superexec or app left behind)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from spmc.flower.localhost import LocalDeployment


@contextmanager
def running(dep: LocalDeployment) -> Iterator[LocalDeployment]:
    """Start ``dep``, hand it to the test, stop it; then each process group it started must be gone."""
    started: list[int] = []
    try:
        dep.start()
        started = dep.pids()
        yield dep
    finally:
        started = sorted(set(started) | set(dep.pids()))
        dep.stop()
        for pid in started:
            with pytest.raises(ProcessLookupError):
                os.killpg(pid, 0)
