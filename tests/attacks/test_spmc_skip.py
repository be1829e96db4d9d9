"""``spmc_skip`` (ATTACKS.md §A5): the attackers train with plain SGD in attack rounds, whatever the client procedure.
The spec is an equivalence: ``client = spmc, update_attack = spmc_skip`` is bit-identical to ``client = spmc,
malicious_client = plain``, on both engines; the ClientApp trains it too; CLI, sweep axis and matrix row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from spmc import make_experiment
from spmc.attacks import ATTACKS
from spmc.attacks.spmc_skip import SpmcSkip
from spmc.cli import main
from spmc.config import build_attack
from spmc.matrix import attack_rows
from spmc.simulation import Simulation
from spmc.sweep import expand_grid

SMALL: dict[str, Any] = {
    "dataset": "synthetic",
    "synthetic_train_size": 200,
    "synthetic_test_size": 50,
    "batch_size": 16,
    "num_clients": 4,
    "gamma": 0.5,  # attackers 2 and 3
    "rounds": 2,
    "baseline_local_epochs": 1,
    "spmc_local_epochs": 1,
    "device": "cpu",
    "kernel": "torch",
    "threads": 1,
    "defense": "spmc",
    "client": "spmc",
    "attack": "badnets",
}


def run(**overrides: Any) -> tuple[Simulation, list[dict[str, Any]]]:
    sim = Simulation(make_experiment(**{**SMALL, **overrides}))
    return sim, [sim.run_round(t) for t in range(sim.cfg.rounds)]


def comparable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in records]


def test_registry_and_hooks() -> None:
    assert ATTACKS["spmc_skip"] is SpmcSkip and SpmcSkip.carries_backdoor and not SpmcSkip.targeted
    assert SpmcSkip.client_procedure == "plain" and SpmcSkip.hooks == {"training"}
    plan = build_attack(make_experiment(**SMALL, update_attack="spmc_skip"))
    assert isinstance(plan.update, SpmcSkip) and plan.client_procedure == "plain" and plan.kind == "backdoor"
    assert plan.training() is None and plan.crafter() is None  # the engines keep their fast path
    assert plan.shadows(0, [0, 1, 2, 3]) == []  # no clean model trained


@pytest.mark.parametrize("engine", ["batched", "sequential"])
def test_bit_identical_to_malicious_client_plain(engine: str) -> None:
    skip, skip_records = run(engine=engine, update_attack="spmc_skip")
    plain, plain_records = run(engine=engine, malicious_client="plain")
    honest, _ = run(engine=engine)  # the attackers run SPMC's procedure (spec §4.5)
    assert [skip.federation.method_for(k) for k in range(4)] == ["spmc", "spmc", "plain", "plain"]
    tasks = skip.tasks(0, [0, 1, 2, 3])
    assert [t.method for t in tasks] == ["spmc", "spmc", "plain", "plain"]
    assert tasks[2].teacher is None and tasks[0].teacher is not None
    assert torch.equal(skip.global_state, plain.global_state)
    assert comparable(skip_records) == comparable(plain_records)  # scores, weights, A, ASR: all bit-identical
    assert not torch.equal(skip.global_state, honest.global_state)  # and it is not the default threat model


def test_only_in_attack_rounds() -> None:
    """Outside attack rounds an attacker trains like a benign client (ATTACKS.md §A1), with SPMC's procedure;
    the equivalence holds under a schedule too."""
    skip, skip_records = run(engine="sequential", update_attack="spmc_skip", attack_start=1)
    plain, plain_records = run(engine="sequential", malicious_client="plain", attack_start=1)
    assert [t.method for t in skip.tasks(0, [0, 1, 2, 3])] == ["spmc"] * 4
    assert [t.method for t in skip.tasks(1, [0, 1, 2, 3])] == ["spmc", "spmc", "plain", "plain"]
    assert torch.equal(skip.global_state, plain.global_state)
    assert comparable(skip_records) == comparable(plain_records)


def test_client_app_trains_plain() -> None:
    """The node's procedure under spmc_skip, and under the threat-model option (tests/test_malicious_client.py)."""
    pytest.importorskip("flwr")
    from flwr.app import Context, RecordDict

    from spmc.flower.client_app import client_setup

    def setup(pid: int, **extra: Any) -> str:
        ctx = Context(
            run_id=1,
            node_id=1,
            node_config={"partition-id": pid, "num-partitions": 4},
            state=RecordDict(),
            run_config={},
        )
        return client_setup(ctx, {**SMALL, **extra}).method

    assert [setup(k, update_attack="spmc_skip") for k in (1, 3)] == ["spmc", "plain"]
    assert setup(3) == "spmc"
    assert [setup(k, client="plain", malicious_client="spmc") for k in (1, 3)] == ["plain", "spmc"]


TINY = ["rounds=1", "synthetic_train_size=200", "batch_size=16", "synthetic_test_size=50", "threads=1", "device=cpu"]


def test_cli_sweep_axis_and_matrix_row(tmp_path: Path) -> None:
    out = tmp_path / "run"
    sets = [a for p in (*TINY, "client=spmc", "defense=spmc", "update_attack=spmc_skip") for a in ("--set", p)]
    assert main(["run", "-p", "smoke", *sets, "--out", str(out), "-q"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["update_attack"], config["client"], config["malicious_client"]) == ("spmc_skip", "spmc", "defense")
    assert json.loads((out / "summary.json").read_text())["attack_kind"] == "backdoor"
    runs = expand_grid({"base": {"preset": "smoke"}, "grid": {"update_attack": ["spmc_skip", "coalition_mimic"]}})
    assert [r.options["update_attack"] for r in runs] == ["spmc_skip", "coalition_mimic"]
    rows = attack_rows(["spmc_skip", "coalition_mimic"], ATTACKS)
    assert [(r.label, r.options) for r in rows] == [
        ("badnets+spmc_skip", {"attack": "badnets", "update_attack": "spmc_skip"}),
        ("badnets+coalition_mimic", {"attack": "badnets", "update_attack": "coalition_mimic"}),
    ]
