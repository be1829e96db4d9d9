"""Short end-to-end runs: clean accuracy rises, and FedAvg learns the paper's backdoor.

The backdoor check runs on the embedded Fashion-MNIST sample: on the synthetic set the classes are separated by
margins so large that the paper's weak trigger (12 entries of one channel) is not implanted within a few rounds,
while on Fashion-MNIST it is, as in the paper.
"""

from __future__ import annotations

import pytest

from spmc import make_experiment, run_experiment


def test_synthetic_fedavg_accuracy_rises() -> None:
    cfg = make_experiment(
        dataset="synthetic",
        num_clients=4,
        gamma=0.25,
        beta=100.0,
        rounds=3,
        baseline_local_epochs=8,
        batch_size=32,
        device="cpu",
    )
    acc = [r["accuracy"] for r in run_experiment(cfg).records]
    assert acc[-1] >= 80.0 and acc[-1] >= acc[0], acc  # from chance (10 %) to ≥ 80 %


@pytest.fixture(scope="module")
def sample_runs() -> dict[str, list[dict]]:
    common = {
        "dataset": "fmnist-sample",
        "num_clients": 4,
        "gamma": 0.5,
        "rounds": 4,
        "baseline_local_epochs": 5,
        "device": "cpu",
    }
    return {attack: run_experiment(make_experiment(**common, attack=attack)).records for attack in ("base", "none")}


def test_fedavg_learns_the_backdoor_on_the_embedded_sample(sample_runs: dict[str, list[dict]]) -> None:
    attacked, clean = sample_runs["base"], sample_runs["none"]
    assert attacked[-1]["accuracy"] > attacked[0]["accuracy"] + 15.0
    asr_attacked = sum(r["asr_excl_target"] for r in attacked[-2:]) / 2
    asr_clean = sum(r["asr_excl_target"] for r in clean[-2:]) / 2
    assert asr_attacked > asr_clean + 10.0, (asr_attacked, asr_clean)
    assert clean[-1]["accuracy"] > 40.0
