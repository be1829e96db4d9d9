"""Seconds per round under each attack, divided by the seconds per round under ``badnets``, in one run (issue 13).

Every registered attack runs a short FedAvg run on the embedded Fashion-MNIST sample with the batched engine (10
clients, γ = 0.3, ``--rounds`` rounds of ``--epochs`` local epochs); a data attack as ``attack``, an update attack
as ``update_attack`` on top of ``badnets`` (so that the ratio isolates what the update attack adds); the update
attacks with a crafting hook also under ``attacker_knowledge = partial`` (the attackers train a clean model each).
The time of a round is its wall time (training, crafting, aggregation, evaluation); a warm-up run comes first, the
first round of every run is left out and the median of the others is taken, best of ``--repeats``.

Prints one JSON object: ``seconds_per_round`` and ``ratio_to_badnets`` per row, the goal (≤ 1.3), and the rows
above it.

Usage: python benchmarks/bench_attacks.py [--rounds 4] [--epochs 1] [--repeats 1] [--only lie pgd]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from typing import Any

import torch

from spmc import make_experiment
from spmc.attacks import ATTACKS
from spmc.simulation import Simulation

GOAL = 1.3


def rows(only: list[str] | None) -> dict[str, dict[str, Any]]:
    """The benchmark's rows: name → configuration overrides."""
    out: dict[str, dict[str, Any]] = {"badnets": {"attack": "badnets"}}
    for name, attack in sorted(ATTACKS.items()):
        if name in ("badnets", "base", "none") or (only and name not in only):
            continue
        if "data" in attack.hooks:
            out[name] = {"attack": name}
        else:
            out[name] = {"attack": "badnets", "update_attack": name}
            if "crafting" in attack.hooks:
                out[f"{name}+partial"] = {"attack": "badnets", "update_attack": name, "attacker_knowledge": "partial"}
    return out


def seconds_per_round(overrides: dict[str, Any], rounds: int, epochs: int) -> float:
    """Median wall time of rounds 1 … rounds − 1 of one run."""
    cfg = make_experiment(
        dataset="fmnist-sample",
        rounds=rounds,
        baseline_local_epochs=epochs,
        spmc_local_epochs=epochs,
        engine="batched",
        checkpoint_every=0,
        **overrides,
    )
    result = Simulation(cfg).run()
    return statistics.median(r["seconds"] for r in result.records[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    seconds_per_round({"attack": "badnets"}, 2, args.epochs)  # warm-up: kernels, caches, the dataset
    seconds: dict[str, float] = {}
    for name, overrides in rows(args.only).items():
        seconds[name] = min(seconds_per_round(overrides, args.rounds, args.epochs) for _ in range(args.repeats))
    base = seconds["badnets"]
    ratios = {name: s / base for name, s in seconds.items()}
    print(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "rounds": args.rounds,
                "local_epochs": args.epochs,
                "seconds_per_round": seconds,
                "ratio_to_badnets": ratios,
                "goal": GOAL,
                "above_goal": sorted(name for name, r in ratios.items() if r > GOAL),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
