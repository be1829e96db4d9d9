"""OpenMP's wait policy (spmc._omp): passive on a busy CPU, OpenMP's default on an idle one, the user's own choice
kept, and chosen before torch loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from spmc import _omp


@pytest.mark.parametrize(
    ("load", "others", "expected"),
    [
        (0.0, 0, None),
        (3.2, 0, None),  # a finished run's load decays for minutes: what is runnable now decides
        (0.0, 1, "PASSIVE"),
        (0.1, 4, "PASSIVE"),
        (0.99, None, None),  # no /proc/loadavg: the load average decides
        (1.0, None, "PASSIVE"),
    ],
)
def test_wait_policy_is_passive_only_on_a_busy_cpu(load: float, others: int | None, expected: str | None) -> None:
    assert _omp.wait_policy({}, load, others) == expected


@pytest.mark.parametrize("key", ["OMP_WAIT_POLICY", "GOMP_SPINCOUNT"])
def test_the_users_own_setting_is_kept(key: str) -> None:
    env = {key: "ACTIVE" if key == "OMP_WAIT_POLICY" else "300000"}
    assert _omp.wait_policy(env, 9.0, 5) is None


@pytest.mark.parametrize(("text", "others"), [("0.52 0.58 0.59 1/251 1234", 0), ("3.1 2.9 2.8 4/300 99", 3)])
def test_runnable_others_reads_proc_loadavg(text: str, others: int) -> None:
    assert _omp.runnable_others(text) == others


def test_apply_sets_only_when_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_omp, "_load_now", lambda: (2.0, 1))
    env: dict[str, str] = {}
    assert _omp.apply(env) == "PASSIVE"
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setattr(_omp, "_load_now", lambda: (0.0, 0))
    quiet: dict[str, str] = {}
    assert _omp.apply(quiet) is None
    assert quiet == {}


_PROBE = """
import json, os, sys
os.environ.pop("OMP_WAIT_POLICY", None)
os.environ.pop("GOMP_SPINCOUNT", None)
seen = []
import builtins
real_open = builtins.open
def busy_open(path, *args, **kwargs):
    if path == "/proc/loadavg":
        seen.append("torch" in sys.modules)
        import io
        return io.StringIO("3.0 3.0 3.0 4/98 1234")
    return real_open(path, *args, **kwargs)
builtins.open = busy_open
import spmc
builtins.open = real_open
print(json.dumps({"torch_loaded_first": seen, "policy": os.environ.get("OMP_WAIT_POLICY"), "chosen": spmc._omp.CHOSEN}))
"""


def test_import_spmc_chooses_before_torch_loads() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"torch_loaded_first": [False] * 5, "policy": "PASSIVE", "chosen": "PASSIVE"}


def test_others_now_takes_the_median(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = iter(["0 0 0 2/9 1", "0 0 0 1/9 1", "0 0 0 1/9 1", "0 0 0 9/9 1", "0 0 0 1/9 1"])
    monkeypatch.setattr(_omp.time, "sleep", lambda _s: None)
    monkeypatch.setattr("builtins.open", lambda *_a, **_k: __import__("io").StringIO(next(texts)))
    assert _omp._others_now() == 0
