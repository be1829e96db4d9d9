"""Seconds to evaluate one global model (A on the clean test set, both ASRs on the triggered set), three ways, in
one run; prints JSON.

- ``three_passes``: the model itself over the test set, the whole triggered set and its non-target part (what
  ``evaluate_state`` did before);
- ``torch``: ``evaluate_state`` with ``kernel = torch``: the model, one pass over the triggered set for both ASRs;
- ``native``: ``evaluate_state`` as it runs by default on the CPU: the same two passes through the stacked SimpleCNN
  with the compiled first block (grey images cost a third of its work).

and Sageflow's evaluation of ten client states on the server's clean split (ℓ_k and H_k, spec §6.3), two ways:

- ``sageflow_model``: the model's forward, batch by batch (``ServerData.logits = None``, what ran before);
- ``sageflow_native``: the stacked SimpleCNN with the native first block, as ``make_server_data`` sets it up.

The states evaluated are the run's θ⁰ plus noise (the cost does not depend on the weights). Best of ``--repeats``;
each Sageflow repeat is a new round (nothing is reused from the last one).

    PYTHONPATH=src python benchmarks/bench_eval.py [--dataset fmnist] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable

import torch

from spmc import make_experiment
from spmc.defenses.server_data import ServerData
from spmc.federation import Federation, evaluate_state
from spmc.training import accuracy


def _best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fmnist-sample", help="fmnist (Debian's full set) or fmnist-sample")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = make_experiment(dataset=args.dataset, attack="badnets", trigger_space="pixel", trigger_channels=[0, 1, 2])
    fed = Federation.build(cfg)
    data, bs = fed.data, cfg.eval_batch_size
    state = fed.initial_state + 0.3 * torch.randn(fed.initial_state.shape, generator=torch.Generator().manual_seed(0))
    keep = data.backdoor_not_target

    def three_passes() -> None:
        fed.layout.load(fed.model, state)
        accuracy(fed.model, data.test_x, data.test_y, bs)
        accuracy(fed.model, data.backdoor_x, data.backdoor_y, bs)
        accuracy(fed.model, data.backdoor_x[keep], data.backdoor_y[keep], bs)

    torch_cfg = cfg.model_copy(update={"kernel": "torch"})
    seconds = {
        "three_passes": _best(three_passes, args.repeats),
        "torch": _best(lambda: evaluate_state(fed.model, fed.layout, data, torch_cfg, state), args.repeats),
        "native": _best(lambda: evaluate_state(fed.model, fed.layout, data, cfg, state), args.repeats),
    }
    server = fed.server_data()
    states = fed.initial_state + 0.3 * torch.randn(10, fed.layout.dim, generator=torch.Generator().manual_seed(1))
    rounds = iter(range(10**6))

    def sageflow_round(data_: ServerData) -> None:
        t = next(rounds)
        for row in states:
            data_.loss_and_entropy(row, t)

    model_server = dataclasses.replace(server, logits=None)
    sageflow = {
        "sageflow_model": _best(lambda: sageflow_round(model_server), args.repeats),
        "sageflow_native": _best(lambda: sageflow_round(server), args.repeats),
    }
    print(
        json.dumps(
            {
                "dataset": args.dataset,
                "threads": args.threads,
                "images": {
                    "test": int(data.test_y.numel()),
                    "triggered": int(data.backdoor_y.numel()),
                    "server": len(server),
                },
                "seconds": {k: round(v, 3) for k, v in seconds.items()},
                "speedup_vs_three_passes": {k: round(seconds["three_passes"] / v, 2) for k, v in seconds.items()},
                "sageflow_seconds_per_round": {k: round(v, 3) for k, v in sageflow.items()},
                "sageflow_speedup": round(sageflow["sageflow_model"] / sageflow["sageflow_native"], 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
