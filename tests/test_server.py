"""The server core shared by the simulator and the Flower strategy (issue 12 §1): sampler, step, checkpoints, and
the dataset facts the Federation reads (§4)."""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from spmc.data import DATASETS, Preprocessor
from spmc.data.strong_aug import strong_augment
from spmc.defenses import DEFENSES
from spmc.federation import Engine, server_transform
from spmc.guard import InvalidUpdateError
from spmc.params import ParamLayout
from spmc.server import CHECKPOINT_FORMAT, ServerCore, sample_participants
from spmc.store import RunDirError
from spmc.training import SequentialEngine

LIN = ParamLayout.from_module(nn.Linear(2, 1))  # weight (2) + bias (1): dim 3, no integer counter


def core(defense: str = "fedavg", **kw: object) -> ServerCore:
    return ServerCore(DEFENSES[defense](), LIN, torch.zeros(3), **kw)  # type: ignore[arg-type]


STATES = [torch.tensor([1.0, 0.0, 2.0]), torch.tensor([3.0, 4.0, 2.0]), torch.tensor([0.0, 8.0, -2.0])]


def test_sampler_takes_everyone_at_full_participation_and_is_seeded_below() -> None:
    assert sample_participants([5, 1, 3], 1.0, seed=0, t=0) == [1, 3, 5]
    picked = sample_participants(range(10), 0.3, seed=7, t=2)
    assert len(picked) == 3 and picked == sorted(picked) and picked == sample_participants(range(10), 0.3, 7, 2)
    assert sample_participants([], 0.5, 0, 0) == []


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.floats(0.05, 1.0), st.integers(0, 2**31), st.integers(0, 50))
def test_sampler_picks_the_same_positions_for_client_ids_and_node_ids(n: int, p: float, seed: int, t: int) -> None:
    """The simulator samples client ids 0..K-1, Flower sorted node ids: the same positions, hence the same clients."""
    nodes = [1000 + 17 * i for i in range(n)]
    by_position = sample_participants(range(n), p, seed, t)
    assert sample_participants(nodes, p, seed, t) == [nodes[i] for i in by_position]
    assert len(by_position) == max(1, math.ceil(p * n - 1e-9))


def test_step_is_fedavgs_mean_of_the_kept_states_and_drops_a_refused_state(caplog: pytest.LogCaptureFixture) -> None:
    server = core()
    bad = torch.tensor([math.nan, 0.0, 0.0])
    with caplog.at_level(logging.WARNING):
        out = server.step(0, [STATES[0], bad, STATES[1]], [0, 1, 2], [1.0, 5.0, 3.0])
    assert out.refused.keys() == {1} and out.kept_ids == (0, 2) and "client 1's state" in caplog.text
    assert torch.allclose(server.global_state, torch.tensor([2.0, 2.0, 2.0]))  # (s0 + s1) / 2: FedAvg is uniform
    assert out.record() == {"accepted": [0, 2], "weights": {"0": 0.5, "2": 0.5}}


def test_every_state_refused_leaves_the_global_model_unchanged() -> None:
    server = core()
    out = server.step(0, [torch.full((3,), math.inf)], [4], [1.0])
    assert out.aggregate is None and out.refused.keys() == {4} and torch.equal(server.global_state, torch.zeros(3))


def test_stop_names_the_first_refused_client_and_all_of_them() -> None:
    server = core(on_invalid_update="stop")
    with pytest.raises(InvalidUpdateError, match=r"^round 2: client 1's state .*refused clients \[1, 2\]"):
        server.step(2, [STATES[0], torch.ones(2), torch.full((3,), math.nan)], [0, 1, 2], [1.0, 1.0, 1.0])
    assert torch.equal(server.global_state, torch.zeros(3))


def test_teachers_are_the_leave_one_out_averages_only_for_learning_clients() -> None:
    plain = core()
    plain.step(0, STATES, [0, 1, 2], [1.0, 1.0, 2.0])
    assert plain.teachers == {}
    server = core(learns_from_teacher=lambda k: k == 2)
    server.step(0, STATES, [0, 1, 2], [1.0, 1.0, 2.0])
    # α = (1/3, 1/3, 1/3): teacher_0 = (s1 + s2) / 2, teacher_2 = (s0 + s1) / 2
    assert torch.allclose(server.teachers[0], (STATES[1] + STATES[2]) / 2)
    assert torch.allclose(server.teachers[2], (STATES[0] + STATES[1]) / 2)


def test_checkpoint_round_trip_with_defense_state() -> None:
    server = core("foolsgold", learns_from_teacher=lambda k: True)
    server.step(0, STATES, [0, 1, 2], [1.0, 1.0, 1.0])
    payload = server.checkpoint(1, "abc", node_clients={"7": 0})
    assert payload["format"] == CHECKPOINT_FORMAT and payload["round"] == 1 and payload["node_clients"] == {"7": 0}
    restored = core("foolsgold")
    assert restored.restore(payload, "abc", max_round=3, teacher_ids=[0, 1, 2]) == 1
    assert torch.equal(restored.global_state, server.global_state)
    assert all(torch.equal(restored.teachers[k], server.teachers[k]) for k in range(3))
    saved = server.defense.state_dict()  # type: ignore[attr-defined]
    assert saved and all(torch.equal(restored.defense.state_dict()[k], v) for k, v in saved.items())  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("edit", "kw", "message"),
    [
        ({"config_hash": "other"}, {}, "written under another configuration"),
        ({"defense": "krum"}, {}, "written by defense 'krum'"),
        ({"layout": ["w"]}, {}, "another model's state"),
        ({"format": 1}, {}, "format 1"),
        ({"round": 4}, {"max_round": 3}, "does not fit this run"),
        ({"teachers": {"7": torch.zeros(3)}}, {"teacher_ids": [0, 1, 2]}, "does not fit this run"),
        ({"teachers": {"0": torch.zeros(4)}}, {}, "does not fit this run"),
        ({"global_state": torch.zeros(2)}, {}, "does not fit this run"),
    ],
)
def test_restore_refuses_what_does_not_fit(edit: dict, kw: dict, message: str) -> None:
    server = core(learns_from_teacher=lambda k: True)
    server.step(0, STATES, [0, 1, 2], [1.0, 1.0, 1.0])
    payload = {**server.checkpoint(1, "abc"), **edit}
    fresh = core()
    with pytest.raises(RunDirError, match=message):
        fresh.restore(payload, "abc", where="run/checkpoint.pt", **kw)
    assert torch.equal(fresh.global_state, torch.zeros(3)) and fresh.teachers == {}


def test_restore_of_another_configuration_only_warns_when_not_strict(caplog: pytest.LogCaptureFixture) -> None:
    payload = core().checkpoint(2, "old")
    with caplog.at_level(logging.WARNING):
        assert core().restore(payload, "new", strict_config=False) == 2
    assert "another configuration" in caplog.text


def test_dataset_facts_choose_the_server_augmentation() -> None:
    cifar, fmnist = DATASETS["cifar10"], DATASETS["fmnist"]
    assert (cifar.server_augmentation, fmnist.server_augmentation) == ("strong", "train")
    strong = server_transform(cifar, Preprocessor(cifar))
    assert isinstance(strong, functools.partial) and strong.func is strong_augment
    pre = Preprocessor(fmnist)
    assert server_transform(fmnist, pre) == pre.train
    assert len(cifar.class_names) == 10 and DATASETS["fmnist-sample"].class_names[0] == "T-shirt"
    assert DATASETS["mnist"].class_names == ()


def test_both_engines_satisfy_the_engine_protocol() -> None:
    model = nn.Linear(2, 1)
    engine: Engine = SequentialEngine(model, LIN, None)  # type: ignore[arg-type]
    assert (engine.name, engine.kernel) == ("sequential", "torch")


def test_no_flower_module_imports_the_simulator() -> None:
    flower = Path(__file__).resolve().parents[1] / "src" / "spmc" / "flower"
    offenders = [p.name for p in flower.glob("*.py") if "spmc.simulation" in p.read_text()]
    assert offenders == []
