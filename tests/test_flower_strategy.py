"""The Flower strategy on hand-made replies: conversions, options, equality with the engine's aggregation, and
rejection of failed, malformed and non-finite replies."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict  # noqa: E402

from spmc import make_experiment  # noqa: E402
from spmc.config import ConfigError, build_defense  # noqa: E402
from spmc.defenses import DEFENSES, RoundInputs  # noqa: E402
from spmc.flower import (  # noqa: E402
    FLOWER_DEFAULTS,
    DefenseStrategy,
    MalformedUpdate,
    arrays_to_state,
    flatten_metrics,
    parse_run_config,
    state_to_arrays,
)
from spmc.guard import finalise_global  # noqa: E402
from spmc.params import ParamLayout  # noqa: E402
from spmc.simulation import InvalidUpdateError, Simulation  # noqa: E402
from spmc.training import ClientResult  # noqa: E402

BN = ParamLayout.from_module(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))  # last entry: integer counter

SMALL = {
    "dataset": "synthetic",
    "synthetic_train_size": 600,
    "synthetic_test_size": 100,
    "num_clients": 5,
    "gamma": 0.2,
    "batch_size": 32,
    "device": "cpu",
    "engine": "sequential",
}


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def reply(
    layout: ParamLayout,
    state: torch.Tensor,
    node: int,
    pid: int | None = None,
    num: float = 10,
    arrays: ArrayRecord | None = None,
    loss: float = 1.0,
) -> Message:
    """A train reply from ``node`` as a ClientApp sends it."""
    ins = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    metrics = {"num-examples": num, "train-loss": loss}
    if pid is not None:
        metrics["partition-id"] = pid
    content = RecordDict(
        {"arrays": arrays if arrays is not None else state_to_arrays(layout, state), "metrics": MetricRecord(metrics)}
    )
    return Message(content, reply_to=ins)


def error_reply(node: int) -> Message:
    ins = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(Error(code=0, reason="ClientApp raised"), reply_to=ins)


def random_states(layout: ParamLayout, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(n, layout.dim, generator=g)
    states[:, layout.int_mask()] = torch.randint(0, 50, (n, int(layout.int_mask().sum())), generator=g).float()
    return states


def test_arrays_round_trip_keeps_names_dtypes_and_values() -> None:
    state = random_states(BN, 1)[0]
    arrays = state_to_arrays(BN, state)
    assert list(arrays.keys()) == [e.name for e in BN.entries]
    assert arrays["1.num_batches_tracked"].dtype == "int64"
    assert torch.equal(arrays_to_state(BN, arrays), state)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.pop("0.bias"), "missing"),
        (lambda a: a.__setitem__("extra", Array(torch.zeros(1).numpy())), "unexpected"),
        (lambda a: a.__setitem__("0.bias", Array(torch.zeros(3).numpy())), "shape"),
        (lambda a: a.__setitem__("0.bias", Array("float32", (2,), "numpy.ndarray", b"junk")), "decoded"),
    ],
)
def test_arrays_that_do_not_fit_the_model_are_refused(mutate, message: str) -> None:
    arrays = state_to_arrays(BN, random_states(BN, 1)[0])
    mutate(arrays)
    with pytest.raises(MalformedUpdate, match=message):
        arrays_to_state(BN, arrays)


def test_flatten_metrics_keeps_numbers_only() -> None:
    flat = flatten_metrics(
        {
            "weights": {"0": 0.25, "3": torch.tensor(0.75)},
            "ok": True,
            "ids": (1, 2),
            "norms": torch.tensor([1.0, 2.0]),
            "name": "x",
            "none": None,
            "nested": [[1]],
        }
    )
    assert flat == {"weights.0": 0.25, "weights.3": 0.75, "ok": 1, "ids": [1, 2], "norms": [1.0, 2.0]}


def test_flatten_metrics_lists_are_all_ints_or_all_floats() -> None:
    flat = flatten_metrics(
        {
            "ints": [np.int64(1), True, 3],
            "mixed": [1, 2.5, np.float32(0.5)],
            "holes": [1.0, None],
            "empty": [],
        }
    )
    assert flat == {"ints": [1, 1, 3], "mixed": [1.0, 2.5, 0.5]}
    assert [type(v) for v in flat["ints"]] == [int, int, int]
    assert [type(v) for v in flat["mixed"]] == [float, float, float]


def test_run_config_maps_to_experiment_and_flower_options() -> None:
    cfg, opts = parse_run_config(
        {"preset": "smoke", "defense": "spmc", "spmc-temperature": 0.5, "trigger_channels": "[0, 1]", "krum_f": "none"},
        {"num-server-rounds": 7, "round-timeout": 5.0, "out-dir": "/tmp/x"},
    )
    assert (cfg.dataset, cfg.num_clients, cfg.defense, cfg.spmc_temperature) == ("synthetic", 4, "spmc", 0.5)
    assert cfg.trigger_channels == (0, 1) and cfg.krum_f is None and cfg.rounds == 7
    assert (opts.round_timeout, opts.out_dir, opts.resume) == (5.0, "/tmp/x", True)
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_run_config({"defence": "spmc"})
    with pytest.raises(ConfigError, match="defense"):
        parse_run_config({"defense": "nope"})


@pytest.mark.parametrize(
    "defense, options", [("fedavg", {"fedavg_weighting": "samples"}), ("spmc", {}), ("multikrum", {})]
)
def test_aggregate_equals_the_engine_for_the_same_client_states(defense: str, options: dict) -> None:
    cfg = make_experiment(**SMALL, defense=defense, client="spmc", **options)
    sim = Simulation(cfg)
    g = torch.Generator().manual_seed(1)
    states = {k: sim.global_state + 0.01 * torch.randn(sim.layout.dim, generator=g) for k in range(5)}
    states[4] = states[4] + 0.2  # an outlier that Multi-Krum leaves out
    sim.engine.train_round = lambda start, tasks: [  # type: ignore[method-assign]
        ClientResult(t.client_id, states[t.client_id].clone(), 1.0, 1) for t in tasks
    ]
    strategy = DefenseStrategy(
        build_defense(cfg), sim.layout, send_teachers=True, initial_state=sim.global_state.clone()
    )
    replies = [  # arrival order and node ids unrelated to the client ids
        reply(sim.layout, states[k], node=900 - 11 * k, pid=k, num=sim.data.num_samples[k]) for k in (3, 0, 4, 1, 2)
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    record = sim.run_round(0)
    assert arrays is not None and metrics is not None
    assert torch.equal(arrays_to_state(sim.layout, arrays), sim.global_state)
    for k in range(5):
        assert torch.equal(strategy.teachers[k], sim.teachers[k])
    assert list(metrics["accepted"]) == record["accepted"]
    if defense == "multikrum":
        assert 4 not in record["accepted"]
    if "weights" in record:
        for k, w in record["weights"].items():
            assert metrics[f"weights.{k}"] == pytest.approx(w, abs=0)


def test_failed_malformed_nonfinite_and_duplicate_replies_are_never_aggregated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    states = random_states(BN, 3)
    initial = torch.zeros(BN.dim)
    strategy = DefenseStrategy(DEFENSES["spmc"](), BN, send_teachers=True, initial_state=initial.clone())
    nan_state = states[0].clone()
    nan_state[1] = math.nan
    missing = state_to_arrays(BN, states[0])
    missing.pop("0.weight")
    replies = [
        reply(BN, states[0], node=10, pid=0),
        reply(BN, states[1], node=11, pid=1),
        error_reply(node=12),
        reply(BN, nan_state, node=13, pid=3),
        reply(BN, states[0], node=14, pid=4, arrays=missing),
        reply(BN, states[2], node=15, pid=1),  # a second reply for client 1
        reply(BN, states[2], node=16, pid=5, num=0),
        reply(BN, states[2], node=17, pid=-1),
        reply(BN, states[2], node=18),  # no partition id: the node id is the client id
    ]
    with caplog.at_level(logging.WARNING, logger="spmc.flower.strategy"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    assert (metrics["num_aggregated"], metrics["num_rejected"], metrics["num_failed"]) == (3, 5, 1)
    assert list(metrics["clients"]) == [0, 1, 18]
    kept = torch.stack([states[0], states[1], states[2]])
    expected = DEFENSES["spmc"]().aggregate(
        RoundInputs(initial, kept, (0, 1, 18), torch.full((3,), 10.0, dtype=torch.float64), BN, 0)
    )
    assert torch.equal(arrays_to_state(BN, arrays), finalise_global(expected.global_state, BN, "spmc", 0))
    assert "NaN or Inf" in caplog.text and "node 12 failed" in caplog.text and "second update" in caplog.text


def test_a_round_without_valid_updates_keeps_the_global_model() -> None:
    initial = random_states(BN, 1, seed=3)[0]
    strategy = DefenseStrategy(DEFENSES["fedavg"](), BN, initial_state=initial.clone())
    arrays, metrics = strategy.aggregate_train(1, [error_reply(1), reply(BN, initial * math.inf, node=2, pid=0)])
    assert arrays is None and metrics is not None and metrics["num_failed"] == 1
    assert torch.equal(strategy.global_state, initial)


def test_on_invalid_update_stop_stops_the_run() -> None:
    strategy = DefenseStrategy(DEFENSES["fedavg"](), BN, on_invalid_update="stop", initial_state=torch.zeros(BN.dim))
    bad = random_states(BN, 1)[0]
    bad[0] = math.nan
    with pytest.raises(InvalidUpdateError):
        strategy.aggregate_train(1, [reply(BN, random_states(BN, 1)[0], node=1, pid=0), reply(BN, bad, 2, pid=1)])


def test_checkpoint_round_trip_includes_the_defense_state() -> None:
    make = lambda: DefenseStrategy(DEFENSES["foolsgold"](), BN, send_teachers=True, initial_state=torch.zeros(BN.dim))  # noqa: E731
    strategy = make()
    states = random_states(BN, 3)
    strategy.aggregate_train(1, [reply(BN, states[k], node=100 + k, pid=k) for k in range(3)])
    payload = strategy.state_dict(1)
    restored = make()
    assert restored.load_state_dict(payload) == 1
    assert torch.equal(restored.global_state, strategy.global_state)
    assert restored.node_clients == {100: 0, 101: 1, 102: 2}
    assert all(torch.equal(restored.teachers[k], strategy.teachers[k]) for k in range(3))
    history = strategy.defense.state_dict()
    assert history and all(torch.equal(restored.defense.state_dict()[k], h) for k, h in history.items())
    with pytest.raises(ConfigError, match="defense"):
        DefenseStrategy(DEFENSES["fedavg"](), BN).load_state_dict(payload)


def test_only_the_flower_package_imports_flwr() -> None:
    src = Path(__file__).resolve().parents[1] / "src" / "spmc"
    offenders = [
        str(path.relative_to(src))
        for path in src.rglob("*.py")
        if "flower" not in path.relative_to(src).parts
        and re.search(r"^\s*(import flwr|from flwr)", path.read_text(), re.MULTILINE)
    ]
    assert offenders == []


def test_the_update_guard_refuses_an_absurd_update_before_the_defense() -> None:
    initial = random_states(BN, 1, seed=4)[0]
    states = random_states(BN, 3, seed=5)
    states[2, 0] = 1e38
    strategy = DefenseStrategy(DEFENSES["fedavg"](), BN, initial_state=initial.clone())
    arrays, metrics = strategy.aggregate_train(1, [reply(BN, states[k], node=10 + k, pid=k) for k in range(3)])
    assert metrics is not None and metrics["num_rejected"] == 1 and metrics["num_aggregated"] == 2
    assert arrays is not None and float(arrays_to_state(BN, arrays).abs().max()) < 1e3
    stop = DefenseStrategy(DEFENSES["fedavg"](), BN, on_invalid_update="stop", initial_state=initial.clone())
    with pytest.raises(InvalidUpdateError, match=r"\[2\]"):
        stop.aggregate_train(1, [reply(BN, states[k], node=10 + k, pid=k) for k in range(3)])


def test_failure_warnings_name_the_round_under_way(caplog: pytest.LogCaptureFixture) -> None:
    """Round 2's failed node and rejected update are reported as round 2 (the 1-based server round of every other
    message), not as round 1 (the server core's 0-based index)."""
    initial = random_states(BN, 1, seed=6)[0]
    strategy = DefenseStrategy(DEFENSES["fedavg"](), BN, initial_state=initial.clone())
    bad = random_states(BN, 1, seed=7)[0]
    bad[0] = math.nan
    replies = [reply(BN, initial, node=10, pid=0), error_reply(node=12), reply(BN, bad, node=13, pid=3)]
    with caplog.at_level(logging.WARNING, logger="spmc.flower.strategy"):
        strategy.aggregate_train(2, replies)
    assert "round 2: node 12 failed" in caplog.text
    assert "round 2: update from node 13 rejected" in caplog.text
    assert "round 1" not in caplog.text
    stop = DefenseStrategy(DEFENSES["fedavg"](), BN, on_invalid_update="stop", initial_state=initial.clone())
    with pytest.raises(InvalidUpdateError, match=r"^round 2: rejected updates from \[13\]"):
        stop.aggregate_train(2, replies)


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flower"


def example_run_config(**user: object) -> dict:
    """What Flower hands the example's apps: its declared run config, with the user's keys merged over it."""
    import tomllib

    declared = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {**declared, **user}


def test_a_preset_applies_over_the_example_apps_declared_defaults(tmp_path: Path) -> None:
    from spmc.config import resolve
    from spmc.flower import run_server
    from tests.attacks._flower_grid import StandInGrid

    cfg, _ = parse_run_config(example_run_config(preset="smoke"))
    assert cfg == resolve("smoke")  # every spmc option the example declares is unset: the preset decides
    cfg, _ = parse_run_config(example_run_config(preset="smoke", rounds=1, defense="spmc"))
    assert (cfg.dataset, cfg.num_clients, cfg.rounds, cfg.defense) == ("synthetic", 4, 1, "spmc")  # user keys win
    assert parse_run_config(example_run_config())[0] == make_experiment()  # nothing set: spmc's defaults
    run = example_run_config(preset="smoke", rounds=1, **{"out-dir": str(tmp_path), "connect-timeout": 0.01})
    run_server(StandInGrid({}), *parse_run_config(run))  # no node: the run only writes what it is
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["dataset"], written["num_clients"], written["rounds"]) == ("synthetic", 4, 1)


def test_every_key_the_docs_document_is_declared_by_the_example() -> None:
    """docs/flower.md's run-config section (its Flower-only table and the option keys it names) against the
    example's pyproject.toml: `flwr run --run-config` can only change declared keys."""
    from spmc.flower.options import SOURCE_KEYS, field_name

    docs = (Path(__file__).resolve().parents[1] / "docs" / "flower.md").read_text()
    section = docs[docs.index("## The app and its configuration") : docs.index("Node config (")]
    node_table = docs[docs.index("Node config (") : docs.index("### Nodes with their own data")]
    node_keys = set(re.findall(r"^\| `([a-z-]+)`", node_table, re.MULTILINE))  # --node-config keys, not run config
    assert "data-dir" in node_keys
    table = re.findall(r"^\| `([a-z][a-z0-9_-]*)` \|", section, re.MULTILINE)
    named = [
        k
        for k in re.findall(r"`([a-z][a-z0-9_-]*)(?: = [^`]*)?`", section)
        if field_name(k) is not None and k not in node_keys
    ]
    documented = set(table) | set(named) | set(SOURCE_KEYS)
    assert set(table) >= set(FLOWER_DEFAULTS), "a Flower-only key is missing from the docs' table"
    declared = set(example_run_config())
    assert sorted(documented - declared) == []
    parse_run_config(example_run_config())  # and every declared key is one the apps accept


def test_the_run_config_check_names_an_undeclared_key(capsys: pytest.CaptureFixture[str]) -> None:
    """Flower refuses an undeclared key with '[code: 15] Invalid run configuration' only; the check names it."""
    from spmc.flower.check import main

    assert main([str(EXAMPLE), "--run-config", 'preset="smoke" identify-timeout=5 no-such-key=1']) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'no-such-key' not declared" in err and "identify-timeout" in err
    assert main([str(EXAMPLE), "--run-config", 'preset="smoke" identify-timeout=5 rounds=3']) == 0
    assert "dataset=synthetic num_clients=4 rounds=3" in capsys.readouterr().out
    assert main([str(EXAMPLE), "--run-config", 'defense="nope"']) == 2
    assert "defense: got 'nope'" in capsys.readouterr().err
