"""Seconds per round of the same small SPMC workload in spmc's engine, in Flower's simulation and in a Flower
deployment on 127.0.0.1.

The workload: SPMC server and client, synthetic images (``--train-size``), ``--clients`` clients (the last ⌊γK⌋
malicious), ``--epochs`` local epochs, batch 32, ``--rounds`` rounds; torch on 1 thread per process.

- ``engine``: :class:`spmc.simulation.Simulation` in this process, batched engine (``engine = auto``) and
  sequential engine (the one the ClientApp uses);
- ``flower_simulation``: ``flwr.simulation.run_simulation`` (Ray backend, one CPU per ClientApp actor);
- ``flower_deployment``: one ``flower-superlink`` and ``--clients`` ``flower-supernode`` processes on loopback and
  ``flwr run examples/flower`` (each ClientApp call is a fresh process, and SuperNodes poll every 3 s).

For the Flower runtimes, ``seconds_per_round`` is the server's wall time per round (train and evaluation) from the
run's ``metrics.jsonl``; ``first_round_s`` includes start-up (Ray, process launches), ``later_rounds_s`` is the mean
of the other rounds, and ``wall_s`` is the whole call including start-up and shut-down.

Usage: python benchmarks/bench_flower.py [--rounds 3] [--clients 4] [--epochs 1] [--skip-deployment]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from spmc import make_experiment
from spmc.simulation import Simulation
from spmc.store import RunStore

APP = Path(__file__).resolve().parents[1] / "examples" / "flower"


def workload(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "dataset": "synthetic",
        "synthetic_train_size": args.train_size,
        "synthetic_test_size": 200,
        "num_clients": args.clients,
        "gamma": 0.25,
        "rounds": args.rounds,
        "baseline_local_epochs": args.epochs,
        "spmc_local_epochs": args.epochs,
        "batch_size": 32,
        "defense": "spmc",
        "client": "spmc",
        "device": "cpu",
    }


def per_round(records: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    seconds = [float(r["seconds"]) for r in records]
    later = seconds[1:]
    return {
        "rounds": len(seconds),
        "seconds_per_round": sum(seconds) / len(seconds) if seconds else None,
        "first_round_s": seconds[0] if seconds else None,
        "later_rounds_s": sum(later) / len(later) if later else None,
        "wall_s": wall,
        "final_accuracy": records[-1].get("accuracy") if records else None,
    }


def bench_engine(work: dict[str, Any], engine: str) -> dict[str, Any]:
    started = time.perf_counter()
    result = Simulation(make_experiment(**work, engine=engine)).run()
    return per_round(result.records, time.perf_counter() - started)


def bench_flower_simulation(work: dict[str, Any], out: Path) -> dict[str, Any]:
    from flwr.simulation import run_simulation

    from spmc.flower import make_client_app, make_server_app

    started = time.perf_counter()
    run_simulation(
        server_app=make_server_app({**work, "out-dir": str(out), "resume": False}),
        client_app=make_client_app({**work, "threads": 1}),
        num_supernodes=work["num_clients"],
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return per_round(RunStore(out).read_metrics(), time.perf_counter() - started)


def bench_flower_deployment(work: dict[str, Any], workdir: Path) -> dict[str, Any]:
    from spmc.flower.localhost import LocalDeployment

    out = workdir / "run"
    started = time.perf_counter()
    with LocalDeployment(APP, workdir, work["num_clients"]) as dep:
        rc = dep.run({**work, "threads": 1, "out-dir": str(out), "resume": False}, timeout=1800)
    result = per_round(RunStore(out).read_metrics(), time.perf_counter() - started)
    result["exit_status"] = rc
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--skip-simulation", action="store_true")
    parser.add_argument("--skip-deployment", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    work = workload(args)
    report: dict[str, Any] = {"workload": work, "torch_threads": 1, "cpu_count": os.cpu_count()}
    report["engine_batched"] = bench_engine(work, "batched")
    report["engine_sequential"] = bench_engine(work, "sequential")
    with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
        if not args.skip_simulation:
            report["flower_simulation"] = bench_flower_simulation(work, Path(tmp) / "simulation")
        if not args.skip_deployment:
            report["flower_deployment"] = bench_flower_deployment(work, Path(tmp) / "deployment")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
