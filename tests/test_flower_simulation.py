"""Flower's in-process simulation (``flwr.simulation.run_simulation``, Ray backend): two rounds of SPMC with four
clients, the last one malicious, give the engine's result."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from flwr.simulation import run_simulation  # noqa: E402

from spmc import make_experiment  # noqa: E402
from spmc.flower import make_client_app, make_server_app  # noqa: E402
from spmc.simulation import Simulation  # noqa: E402
from spmc.store import RunStore  # noqa: E402

TINY = {
    "dataset": "synthetic",
    "synthetic_train_size": 400,
    "synthetic_test_size": 100,
    "num_clients": 4,
    "gamma": 0.25,
    "rounds": 2,
    "baseline_local_epochs": 1,
    "spmc_local_epochs": 1,
    "batch_size": 32,
    "device": "cpu",
    "defense": "spmc",
    "client": "spmc",
}


@pytest.mark.slow  # ~12-15 s: Ray starts a local cluster
@pytest.mark.filterwarnings("ignore::FutureWarning")  # Ray's notice about accelerator env vars
def test_two_rounds_of_spmc_in_flower_simulation(tmp_path) -> None:
    server = {**TINY, "out-dir": str(tmp_path), "resume": False}
    client = {**TINY, "threads": 1}
    run_simulation(
        server_app=make_server_app(server),
        client_app=make_client_app(client),
        num_supernodes=4,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    store = RunStore(tmp_path)
    records = store.read_metrics()
    assert [r["server_round"] for r in records] == [1, 2]
    for r in records:
        assert (r["num_aggregated"], r["num_failed"], r["num_rejected"]) == (4, 0, 0)
        assert r["reported_malicious"] == [3]
        assert sorted(r["weights"]) == ["0", "1", "2", "3"] and 0.0 <= r["asr"] <= 100.0
    checkpoint = store.load_checkpoint()
    assert (
        checkpoint is not None and checkpoint["round"] == 2 and sorted(checkpoint["teachers"]) == ["0", "1", "2", "3"]
    )
    engine = Simulation(make_experiment(**TINY, engine="sequential")).run()
    assert torch.allclose(checkpoint["global_state"], engine.global_state, atol=1e-5)
    assert [r["accuracy"] for r in records] == pytest.approx([r["accuracy"] for r in engine.records], abs=1.01)
