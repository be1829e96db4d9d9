"""Aggregation time of every registered defense on SimpleCNN-sized states (d = 92,626).

Prints one JSON object: {defense: {n: seconds}} for n = 10 and 100 (best of --repeats). Defenses that need server
data get 640 synthetic validation images (FLTrust trains on them, so its time includes that training).

Usage: python benchmarks/bench_defenses.py [--sizes 10 100] [--repeats 2] [--only krum rfa]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from spmc import make_experiment
from spmc.config import build_defense
from spmc.defenses import DEFENSES, RoundInputs
from spmc.defenses.server_data import ServerData
from spmc.models import SimpleCNN
from spmc.params import ParamLayout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    model = SimpleCNN()
    layout = ParamLayout.from_module(model)
    gen = torch.Generator().manual_seed(0)
    glob = layout.flatten(model)
    server = ServerData(
        x=torch.randn(640, 3, 32, 32, generator=gen),
        y=torch.randint(0, 10, (640,), generator=gen),
        transform=lambda x, g: x,
        model=SimpleCNN(),
        layout=layout,
    )
    out: dict[str, dict[str, float]] = {}
    for name in args.only or sorted(DEFENSES):
        out[name] = {}
        for n in args.sizes:
            states = glob + 0.01 * torch.randn(n, layout.dim, generator=gen)
            cfg = make_experiment(defense=name, num_clients=n, gamma=0.2, rounds=50, drop_last=False)
            inputs = RoundInputs(glob, states, tuple(range(n)), torch.full((n,), 500.0), layout, 1, server)
            best = float("inf")
            for _ in range(args.repeats):
                defense = build_defense(cfg)
                start = time.perf_counter()
                defense.aggregate(inputs)
                best = min(best, time.perf_counter() - start)
            out[name][str(n)] = best
    print(json.dumps({"threads": torch.get_num_threads(), "seconds": out}, indent=2))


if __name__ == "__main__":
    main()
