"""Batched vs sequential engine, measured in one run (issue 4).

Prints one JSON object:
- ``kernel``: the batched engine's first-block kernel here (``native`` where the C kernel builds, else ``torch``);
- ``matmul_gflops``: the fp32 matmul ceiling of this machine (2048² × 2048², best of 5);
- ``throughput_grey``, ``throughput_colour``: samples/s of both engines for the plain and the SPMC client on
  SimpleCNN with 10 clients of equal size (batch 64), the speed-up, and the achieved GFLOP/s as a fraction of the
  ceiling (SimpleCNN: 1.364 MFLOP forward, 2.022 MFLOP backward per sample, the backward without conv1's input
  gradient; an SPMC step is one student forward, one teacher forward and two backward passes). Measured on grey
  images (Fashion-MNIST's sizes: 28×28, one channel, copied to 3) and on colour ones (3 different channels,
  32×32, as CIFAR-10): the batched engine's native kernel convolves a grey client's single channel with the
  weights summed over the channels and computes the second block's gradients from the pooled maxima only, so its
  GFLOP/s count the model's nominal (dense) FLOPs, not the ones it executes. ``batched_torch_kernel`` is the
  batched engine with torch's convolutions instead (``kernel = "torch"``);
- ``round``: seconds per round of the paper-fmnist protocol (Dirichlet(0.5) over 54,000 images, SPMC client, 10
  local epochs) for 10 clients and for 100 clients with the same total data, measured on one local epoch and scaled
  by 10, with the projected time of a 50-round run. The images are synthetic (same sizes as Fashion-MNIST), so the
  benchmark needs no dataset files.

Usage: python benchmarks/bench_engine.py [--threads N] [--repeats 2] [--skip-round]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from spmc import make_experiment
from spmc.batched import BatchedEngine
from spmc.simulation import Simulation, optim_config
from spmc.training import OptimConfig, SequentialEngine, batches

FWD_MFLOP = 1.364
BWD_MFLOP = 2.022
MFLOP_PER_SAMPLE = {"plain": FWD_MFLOP + BWD_MFLOP, "spmc": 2 * FWD_MFLOP + 2 * BWD_MFLOP}


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _sim(client: str, num_clients: int, train_size: int, beta: float, epochs: int, colour: bool = False) -> Simulation:
    """A synthetic federation; with ``colour`` every client's images are replaced by random 3-channel ones."""
    cfg = make_experiment(
        dataset="synthetic",
        synthetic_train_size=train_size,
        synthetic_test_size=100,
        num_clients=num_clients,
        beta=beta,
        attack="none",
        defense="spmc",
        client=client,
        baseline_local_epochs=epochs,
        spmc_local_epochs=epochs,
        device="cpu",
        engine="batched",
    )
    sim = Simulation(cfg)
    if colour:
        gen = torch.Generator().manual_seed(0)
        for data in sim.data.clients.values():
            data.x = torch.rand(len(data), 3, 32, 32, generator=gen)
    return sim


def _time_round(engine: SequentialEngine | BatchedEngine, sim: Simulation, repeats: int) -> tuple[float, int]:
    tasks = sim.tasks(0, sim.participants(0))
    best, samples = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        results = engine.train_round(sim.global_state, tasks)
        best = min(best, time.perf_counter() - start)
        samples = sum(r.steps for r in results) * sim.cfg.batch_size
    return best, samples


def pipeline_seconds(sim: Simulation) -> float:
    """Time of the batched engine's data pipeline alone for one round: drawing every client's mini-batches
    (shuffle, gather, augmentation, normalisation) and stacking them, without training."""
    engine = sim.engine
    assert isinstance(engine, BatchedEngine)
    tasks = sim.tasks(0, sim.participants(0))
    start = time.perf_counter()
    iters = [batches(t.data, t.epochs, sim.cfg.batch_size, torch.Generator().manual_seed(t.seed)) for t in tasks]
    while True:
        step = [item for item in (next(it, None) for it in iters) if item is not None]
        if not step:
            break
        engine._gather(step, sim.global_state.device)
    return time.perf_counter() - start


def throughput(ceiling: float, repeats: int, colour: bool) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for client in ("plain", "spmc"):
        sim = _sim(client, 10, int(10 * 640 / 0.9) + 10, 1e6, 1, colour)
        # give every client non-trivial teachers, as from round 1 on
        sim.teachers = {k: sim.global_state + 0.01 * torch.randn_like(sim.global_state) for k in sim.teachers}
        engines = {
            "sequential": SequentialEngine(sim.model, sim.layout, optim_config(sim.cfg)),
            "batched": sim.engine,
            "batched_torch_kernel": BatchedEngine(sim.layout, optim_config(sim.cfg), kernel="torch"),
        }
        row: dict[str, float] = {}
        for name, engine in engines.items():
            _time_round(engine, sim, 1)  # warm-up
            seconds, samples = _time_round(engine, sim, repeats)
            row[f"{name}_samples_per_s"] = samples / seconds
            gflops = samples * MFLOP_PER_SAMPLE[client] / 1e3 / seconds
            row[f"{name}_gflops"] = gflops
            row[f"{name}_fraction_of_ceiling"] = gflops / ceiling
        row["speedup"] = row["batched_samples_per_s"] / row["sequential_samples_per_s"]
        row["batched_pipeline_fraction"] = pipeline_seconds(sim) / _time_round(sim.engine, sim, 1)[0]
        out[client] = row
    return out


def round_times() -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for clients in (10, 100):
        sim = _sim("spmc", clients, 60_000, 0.5, 1)
        seconds, samples = _time_round(sim.engine, sim, 1)
        start = time.perf_counter()
        sim.evaluate()
        eval_seconds = time.perf_counter() - start
        per_round = 10 * seconds + eval_seconds
        out[str(clients)] = {
            "one_epoch_seconds": seconds,
            "samples_per_epoch": samples,
            "seconds_per_round_10_epochs": per_round,
            "projected_50_rounds_minutes": 50 * per_round / 60,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-round", action="store_true", help="skip the paper-fmnist round timing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ceiling = matmul_gflops()
    result: dict[str, object] = {
        "threads": torch.get_num_threads(),
        "kernel": BatchedEngine(_sim("plain", 2, 200, 1.0, 1).layout, OptimConfig()).kernel,
        "matmul_gflops": ceiling,
        "throughput_grey": throughput(ceiling, args.repeats, colour=False),
        "throughput_colour": throughput(ceiling, args.repeats, colour=True),
    }
    if not args.skip_round:
        result["round"] = round_times()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
