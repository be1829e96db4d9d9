"""Pinned metrics of a few short runs, so that a refactoring that should not change results cannot change them.

The numbers in ``tests/data/pinned_metrics.json`` were computed on main before the core was reshaped (issue 12),
with ``python tests/test_regression.py --write``. Per round: accuracy and ASR (to one test image), the mean training
loss (relative 1e-4) and the global state's sum and norm (relative 1e-4) — tolerances that absorb float rounding
across CPUs but no change of algorithm, data or random stream.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from spmc import make_experiment
from spmc.simulation import Simulation

PINNED = Path(__file__).parent / "data" / "pinned_metrics.json"

SYNTHETIC: dict[str, Any] = {
    "dataset": "synthetic",
    "synthetic_train_size": 600,
    "synthetic_test_size": 100,
    "num_clients": 4,
    "gamma": 0.25,
    "rounds": 2,
    "baseline_local_epochs": 1,
    "spmc_local_epochs": 1,
    "batch_size": 32,
    "device": "cpu",
}
SAMPLE: dict[str, Any] = {
    "dataset": "fmnist-sample",
    "num_clients": 5,
    "gamma": 0.2,
    "rounds": 2,
    "baseline_local_epochs": 1,
    "spmc_local_epochs": 1,
    "device": "cpu",
}
RUNS: dict[str, dict[str, Any]] = {
    "synthetic-fedavg-sequential": {**SYNTHETIC, "engine": "sequential"},
    "synthetic-fedavg-batched": {**SYNTHETIC, "engine": "batched"},
    "synthetic-spmc-spmc": {**SYNTHETIC, "defense": "spmc", "client": "spmc"},
    "synthetic-median": {**SYNTHETIC, "defense": "median", "num_clients": 5, "gamma": 0.2},
    "synthetic-foolsgold-spmc-client": {**SYNTHETIC, "defense": "foolsgold", "client": "spmc"},
    "sample-fedavg": {**SAMPLE},
    "sample-spmc-spmc": {**SAMPLE, "defense": "spmc", "client": "spmc", "spmc_temperature": 0.1},
}


def measure(options: dict[str, Any]) -> list[dict[str, float]]:
    sim = Simulation(make_experiment(**options))
    out = []
    for t in range(options["rounds"]):
        record = sim.run_round(t)
        state = sim.global_state.double()
        out.append(
            {
                "accuracy": record["accuracy"],
                "asr": record["asr"],
                "train_loss": record["train_loss"],
                "state_sum": float(state.sum()),
                "state_norm": float(state.norm()),
                "test_size": int(sim.data.test_y.shape[0]),
            }
        )
    return out


@pytest.mark.parametrize("name", sorted(RUNS))
def test_metrics_are_the_pinned_ones(name: str) -> None:
    pinned = json.loads(PINNED.read_text())[name]
    got = measure(RUNS[name])
    assert len(got) == len(pinned)
    for g, p in zip(got, pinned):
        image = 100.0 / p["test_size"] + 1e-9
        assert abs(g["accuracy"] - p["accuracy"]) <= image and abs(g["asr"] - p["asr"]) <= image
        for key in ("train_loss", "state_sum", "state_norm"):
            assert math.isclose(g[key], p[key], rel_tol=1e-4, abs_tol=1e-6), (key, g[key], p[key])


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    PINNED.write_text(json.dumps({name: measure(opts) for name, opts in RUNS.items()}, indent=1) + "\n")
