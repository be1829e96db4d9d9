"""Checkpoints and resume (issue 5): a run killed at any moment and resumed gives the same metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spmc import make_experiment
from spmc.simulation import Simulation

ARGS = [
    "--dataset", "synthetic", "--num-clients", "4", "--gamma", "0.25", "--rounds", "5", "--local-epochs", "1",
    "--defense", "foolsgold", "--client", "spmc",
    "--set", "synthetic_train_size=600", "--set", "synthetic_test_size=100", "--set", "device=\"cpu\"", "-q",
]  # fmt: skip
COMPARED = ("round", "accuracy", "asr", "asr_all", "asr_excl_target", "train_loss", "weights", "client_loss")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _spmc(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "spmc", "run", *args], env=env, stdout=subprocess.DEVNULL)


def test_killed_run_resumes_to_identical_metrics(tmp_path: Path) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert _spmc(*ARGS, "--out", str(full)).wait(timeout=300) == 0
    proc = _spmc(*ARGS, "--out", str(killed))
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if (killed / "metrics.jsonl").exists() and len(_metrics(killed)) >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (killed / "summary.json").exists()
    assert _spmc("--resume", str(killed), "-q").wait(timeout=300) == 0
    a, b = _metrics(full), _metrics(killed)
    assert [r["round"] for r in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in COMPARED} == {k: rb[k] for k in COMPARED}
    sa = json.loads((full / "summary.json").read_text())
    sb = json.loads((killed / "summary.json").read_text())
    assert (sa["A"], sa["R"], sa["V"]) == (sb["A"], sb["R"], sb["V"])


def test_resume_in_process_restores_defense_state(tmp_path: Path) -> None:
    cfg = make_experiment(
        dataset="synthetic", synthetic_train_size=600, synthetic_test_size=100, num_clients=4, gamma=0.25,
        rounds=3, baseline_local_epochs=1, defense="foolsgold", device="cpu",
    )  # fmt: skip
    reference = Simulation(cfg, tmp_path / "a").run()

    def stop_after_round_1(record: dict) -> None:
        if record["round"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Simulation(cfg, tmp_path / "b").run(stop_after_round_1)
    assert len(_metrics(tmp_path / "b")) == 2
    resumed = Simulation(cfg, tmp_path / "b").run(resume=True)
    assert [r["accuracy"] for r in resumed.records] == [r["accuracy"] for r in reference.records]
    assert resumed.global_state.equal(reference.global_state)


def test_resume_without_run_directory_is_a_clear_error(tmp_path: Path) -> None:
    from spmc.cli import main

    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    with pytest.raises(Exception, match="config.json"):
        from spmc.simulation import load_run_config

        load_run_config(tmp_path)
