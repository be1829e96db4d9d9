"""Sweep throughput: the same small grid on 1 local process, 2 local jobs and a 2-node local Ray cluster (1 CPU per
node), measured in one run; prints JSON with wall seconds and the speed-up over 1 process.

    PYTHONPATH=src python benchmarks/bench_sweep.py [--rounds 30] [--points 4]

Every run has 1 thread (``threads = 1``), so the three give identical metrics (checked) and the speed-up is the
parallelism alone. The cluster's start-up is not timed (a cluster is started once for many sweeps); the Ray
sweep's connection and task submission are. Goal (issue 15): >= 1.8x for 2 nodes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from spmc.cluster import LocalCluster, RayOptions
from spmc.sweep import run_sweep


def _metrics(root: Path) -> dict[str, list[float]]:
    """Per run: its per-round accuracies and train losses (what must agree across the three ways)."""
    out = {}
    for run in sorted(p for p in root.iterdir() if p.is_dir()):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        out[run.name] = [v for r in records for v in (r["accuracy"], r["train_loss"])]
    return out


def _timed(spec: dict[str, Any], out: Path, **kwargs: Any) -> float:
    start = time.perf_counter()
    outcomes = run_sweep(spec, out, **kwargs)
    seconds = time.perf_counter() - start
    bad = [(o.run.name, o.status, o.error) for o in outcomes if o.status != "done"]
    if bad:
        raise SystemExit(f"bench_sweep: runs did not finish: {bad}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="rounds per run (30: ~20 s a run here)")
    parser.add_argument("--points", type=int, default=4, help="grid points (seeds)")
    args = parser.parse_args()
    spec = {
        "base": {"preset": "smoke", "device": "cpu", "threads": 1, "rounds": args.rounds},
        "grid": {"seed": list(range(args.points))},
    }
    work = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))  # short: Ray's socket paths live under it
    cluster = LocalCluster([1, 1], work / "ray")
    try:
        one = _timed(spec, work / "one", jobs=1)
        two = _timed(spec, work / "two", jobs=2)
        cluster.start()
        ray = _timed(spec, work / "raysweep", ray=RayOptions(cluster.address, cpus_per_run=1))
        same = _metrics(work / "one") == _metrics(work / "two") == _metrics(work / "raysweep")
    finally:
        left = cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "grid": f"{args.points} points of the smoke preset, {args.rounds} rounds, 1 thread each",
        "cpus": os.cpu_count(),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": {
            "local_1_process": round(one, 1),
            "local_2_jobs": round(two, 1),
            "ray_2_nodes_1_cpu": round(ray, 1),
        },
        "speedup_vs_1_process": {"local_2_jobs": round(one / two, 2), "ray_2_nodes_1_cpu": round(one / ray, 2)},
        "identical_metrics": same,
        "cluster_processes_left": left,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
