"""Threads on a busy CPU: seconds per round of a small run with torch's default threads (one per core), idle and
beside ``--busy`` CPU-bound processes, with OpenMP spinning (GNU's default) and waiting passively (what spmc
chooses on a busy CPU, ``spmc._omp``); 1 thread beside the same load for reference. Measured in one run; prints JSON.

    PYTHONPATH=src python benchmarks/bench_threads.py [--rounds 3] [--busy 1]

Each case is a separate ``spmc run`` (OpenMP reads its wait policy once, as torch loads). "spin" sets
``GOMP_SPINCOUNT=300000`` (libgomp's default count, and a user setting, so spmc leaves it alone); "passive" sets
``OMP_WAIT_POLICY=PASSIVE``. The busy processes (``--kind``) are 1-thread torch matmul loops (what
a sweep's other runs look like) or pure-Python loops, each in its own session
like another program (Linux schedules sessions as groups: busy children of the benchmark's own session barely
disturb it), stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_POLICIES = {"spin": {"GOMP_SPINCOUNT": "300000"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


def _seconds_per_round(rounds: int, threads: int, policy: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(_POLICIES[policy])
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "spmc", "run", "-q", "--preset", "demo", "--out", out]
        cmd += ["--set", f"rounds={rounds}", "--set", f"threads={threads}"]
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=3600)
        summary = json.loads((Path(out) / "summary.json").read_text())
    return float(summary["seconds_per_round"])


_BUSY = {
    "python": "while True: pass",
    "torch": "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True: a @ a",
}


def _busy(n: int, kind: str) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", _BUSY[kind]], start_new_session=True) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the demo preset per case")
    parser.add_argument("--busy", type=int, default=1, help="CPU-bound processes beside the run in the busy cases")
    parser.add_argument("--kind", choices=sorted(_BUSY), default="torch", help="busy loop: 1-thread matmuls or Python")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    result: dict[str, object] = {"cores": cores, "busy": args.busy, "busy_kind": args.kind, "rounds": args.rounds}
    idle = {p: _seconds_per_round(args.rounds, cores, p) for p in _POLICIES}
    procs = _busy(args.busy, args.kind)
    try:
        time.sleep(1.0)
        busy = {p: _seconds_per_round(args.rounds, cores, p) for p in _POLICIES}
        busy["one_thread"] = _seconds_per_round(args.rounds, 1, "passive")
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    result["idle_s_per_round"] = idle
    result["busy_s_per_round"] = busy
    result["idle_passive_over_spin"] = idle["passive"] / idle["spin"]
    result["busy_spin_over_passive"] = busy["spin"] / busy["passive"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
