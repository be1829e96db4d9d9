"""The round loop (spec §1.5): determinism, order independence, SPMC teachers, rejection of bad states."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from spmc import make_experiment
from spmc.defenses import marginal_teachers
from spmc.simulation import Simulation

SMALL = {
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


def test_same_seed_same_result_and_other_seed_differs() -> None:
    a = Simulation(make_experiment(**SMALL, defense="spmc", client="spmc")).run()
    b = Simulation(make_experiment(**SMALL, defense="spmc", client="spmc")).run()
    c = Simulation(make_experiment(**SMALL, defense="spmc", client="spmc", seed=1)).run()
    assert torch.equal(a.global_state, b.global_state)
    assert [r["accuracy"] for r in a.records] == [r["accuracy"] for r in b.records]
    assert not torch.equal(a.global_state, c.global_state)


def test_client_order_does_not_change_client_states() -> None:
    sim = Simulation(make_experiment(**SMALL))
    tasks = sim.tasks(0, [0, 1, 2, 3])
    forward = sim.engine.train_round(sim.global_state, tasks)
    backward = sim.engine.train_round(sim.global_state, tasks[::-1])
    by_id = {r.client_id: r.state for r in backward}
    for r in forward:
        assert torch.equal(r.state, by_id[r.client_id])


def test_spmc_teachers_are_weighted_leave_one_out_models() -> None:
    sim = Simulation(make_experiment(**{**SMALL, "rounds": 1}, defense="spmc", client="spmc"))
    first = sim.global_state.clone()
    assert all(torch.equal(t, first) for t in sim.teachers.values())  # round 0: θ^0 (spec §4.1)
    ids = sim.participants(0)
    results = sim.engine.train_round(sim.global_state, sim.tasks(0, ids))
    states = torch.stack([r.state for r in results])
    record = sim.run_round(0)
    w = torch.tensor([record["weights"][str(k)] for k in ids], dtype=torch.float64)
    expected = marginal_teachers(w.float() @ states, states, w)
    for k, row in zip(ids, expected):
        assert torch.allclose(sim.teachers[k], row, atol=1e-5)
    assert w.sum().item() == pytest.approx(1.0)
    assert set(record["scores"]) == {str(k) for k in ids}


def test_nan_client_state_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    sim = Simulation(make_experiment(**{**SMALL, "rounds": 1}))
    original = sim.engine.train_round

    def poisoned(start: torch.Tensor, tasks: list) -> list:
        results = original(start, tasks)
        results[1].state[5] = math.nan
        return results

    monkeypatch.setattr(sim.engine, "train_round", poisoned)
    record = sim.run_round(0)
    assert record["rejected"] == [1]
    assert 1 not in record["accepted"]
    assert torch.isfinite(sim.global_state).all()


def test_run_directory_contents(tmp_path: Path) -> None:
    cfg = make_experiment(**SMALL, defense="spmc", client="spmc")
    result = Simulation(cfg, tmp_path / "run").run()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1]
    first = json.loads(lines[0])
    for key in ("accuracy", "asr", "asr_all", "asr_excl_target", "train_loss", "scores", "weights", "seconds"):
        assert key in first
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["A"] == pytest.approx(result.final.A)
    # A, R, V of the summary from the per-round records on disk (2 rounds < report_last_k = 5: both count)
    records = [json.loads(line) for line in lines]
    a = sum(r["accuracy"] for r in records) / 2
    r_ = 100 - sum(r["asr"] for r in records) / 2
    assert (summary["A"], summary["R"], summary["V"]) == pytest.approx((a, r_, (a + r_) / 2))
    assert summary["R_excl_target"] == pytest.approx(100 - sum(r["asr_excl_target"] for r in records) / 2)
    assert (summary["last_k"], summary["rounds"]) == (2, 2)
    # the clients hold the 600 synthetic training images minus the server's last 10 %
    assert sum(summary["num_samples"].values()) == 540
    assert summary["malicious_ids"] == [3]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["defense"] == "spmc"


def test_partial_participation_keeps_absent_teachers() -> None:
    sim = Simulation(make_experiment(**{**SMALL, "rounds": 1}, defense="spmc", client="spmc", participation=0.5))
    ids = sim.participants(0)
    assert len(ids) == 2 and ids == sorted(ids)
    before = {k: t.clone() for k, t in sim.teachers.items()}
    sim.run_round(0)
    for k in set(range(4)) - set(ids):
        assert torch.equal(sim.teachers[k], before[k])


def test_invalid_states_stop_the_run_when_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    from spmc.simulation import InvalidUpdateError

    sim = Simulation(make_experiment(**{**SMALL, "rounds": 1}, on_invalid_update="stop"))
    original = sim.engine.train_round

    def wrong_size(start: torch.Tensor, tasks: list) -> list:
        results = original(start, tasks)
        results[2].state = results[2].state[:-1]
        return results

    monkeypatch.setattr(sim.engine, "train_round", wrong_size)
    before = sim.global_state.clone()
    with pytest.raises(InvalidUpdateError, match="client 2's state has shape"):
        sim.run_round(0)
    assert torch.equal(sim.global_state, before)
