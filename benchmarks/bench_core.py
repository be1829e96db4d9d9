"""Core benchmark: training throughput of both client procedures and the cost of one SPMC aggregation.

Prints one JSON object:
- ``train``: for ``plain`` and ``spmc`` clients, samples/s and seconds per round of the sequential engine on
  SimpleCNN (10 clients, batch 64, data in memory, augmentation included), measured in one run;
- ``spmc_aggregation``: seconds of one SPMC aggregation (scores, weights, weighted state, teachers) for n = 10, 100
  and 1000 SimpleCNN-sized states (d = 92,626).

Usage: python benchmarks/bench_core.py [--clients 10] [--samples-per-client 640] [--epochs 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from spmc import SPMC, RoundInputs, make_experiment, marginal_teachers
from spmc.models import SimpleCNN
from spmc.params import ParamLayout
from spmc.simulation import Simulation


def bench_training(clients: int, per_client: int, epochs: int, repeats: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    sims = {}
    for client in ("plain", "spmc"):
        cfg = make_experiment(
            dataset="synthetic",
            synthetic_train_size=int(clients * per_client / 0.9) + 1,
            synthetic_test_size=100,
            num_clients=clients,
            beta=100.0,
            gamma=0.0,
            attack="none",
            defense="spmc" if client == "spmc" else "fedavg",
            client=client,
            baseline_local_epochs=epochs,
            spmc_local_epochs=epochs,
            device="cpu",
        )
        sims[client] = Simulation(cfg)
    for client, sim in sims.items():
        tasks = sim.tasks(0, sim.participants(0))
        sim.engine.train_round(sim.global_state, tasks[:1])  # warm-up
        best = float("inf")
        samples = 0
        for _ in range(repeats):
            start = time.perf_counter()
            results = sim.engine.train_round(sim.global_state, tasks)
            best = min(best, time.perf_counter() - start)
            samples = sum(r.steps for r in results) * sim.cfg.batch_size
        out[client] = {"samples_per_s": samples / best, "seconds_per_round": best, "samples_per_round": samples}
    out["spmc_over_plain_time"] = {"ratio": out["spmc"]["seconds_per_round"] / out["plain"]["seconds_per_round"]}
    return out


def bench_aggregation(sizes: list[int], repeats: int) -> dict[str, float]:
    layout = ParamLayout.from_module(SimpleCNN())
    gen = torch.Generator().manual_seed(0)
    defense = SPMC()
    out: dict[str, float] = {}
    for n in sizes:
        base = torch.randn(layout.dim, generator=gen)
        states = base + 0.01 * torch.randn(n, layout.dim, generator=gen)
        inputs = RoundInputs(base, states, tuple(range(n)), torch.full((n,), 100.0), layout, 0)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            agg = defense.aggregate(inputs)
            marginal_teachers(agg.global_state, states, agg.weights)
            best = min(best, time.perf_counter() - start)
        out[str(n)] = best
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--samples-per-client", type=int, default=640)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    args = parser.parse_args()
    result = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "train": bench_training(args.clients, args.samples_per_client, args.epochs, args.repeats),
        "spmc_aggregation_seconds": bench_aggregation(args.sizes, args.repeats),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
