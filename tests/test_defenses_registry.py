"""Properties every registered defense must have (issue 3), checked across the whole registry."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from spmc import make_experiment
from spmc.config import build_defense
from spmc.defenses import DEFENSES, FoolsGold, Krum, RoundInputs, Stateful
from spmc.defenses.server_data import ServerData
from spmc.metrics import detection_scores
from spmc.params import ParamLayout
from spmc.simulation import Simulation

NAMES = sorted(DEFENSES)


def _module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 10))


def _server_data(layout: ParamLayout) -> ServerData:
    g = torch.Generator().manual_seed(0)
    return ServerData(
        x=torch.randn(128, 3, 4, 4, generator=g),
        y=torch.randint(0, 10, (128,), generator=g),
        transform=lambda x, gen: x,
        model=_module(),
        layout=layout,
    )


def _inputs(n: int, seed: int, order: list[int] | None = None) -> RoundInputs:
    module = _module()
    layout = ParamLayout.from_module(module)
    g = torch.Generator().manual_seed(seed)
    glob = layout.flatten(module)
    states = glob + 0.05 * torch.randn(n, layout.dim, generator=g)
    states[:, layout.int_mask()] = glob[layout.int_mask()] + 7.0  # every client took 7 steps
    ids = list(range(10, 10 + n))
    counts = torch.randint(50, 500, (n,), generator=g).to(torch.float64)
    order = order or list(range(n))
    return RoundInputs(
        glob, states[order], tuple(ids[i] for i in order), counts[order], layout, 3, _server_data(layout)
    )


def _defense(name: str, n: int):  # noqa: ANN202
    cfg = make_experiment(defense=name, num_clients=n, gamma=0.1 if n >= 10 else 0.2, rounds=10)
    return build_defense(cfg)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 1000), data=st.data())
def test_permuting_clients_changes_nothing(name: str, seed: int, data: st.DataObject) -> None:
    n = 11
    order = data.draw(st.permutations(list(range(n))))
    a = _defense(name, n).aggregate(_inputs(n, seed))
    b = _defense(name, n).aggregate(_inputs(n, seed, list(order)))
    assert torch.allclose(a.global_state, b.global_state, atol=1e-5, rtol=1e-5)
    if a.accepted is not None:
        assert sorted(a.accepted) == sorted(b.accepted)
    if a.weights is not None:
        wa = dict(zip(_inputs(n, seed).client_ids, a.weights.tolist()))
        wb = dict(zip(_inputs(n, seed, list(order)).client_ids, b.weights.tolist()))
        assert wa == pytest.approx(wb, abs=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_weights_are_a_distribution_and_state_is_finite(name: str) -> None:
    agg = _defense(name, 11).aggregate(_inputs(11, 0))
    assert torch.isfinite(agg.global_state).all()
    assert agg.global_state.shape == (_inputs(11, 0).layout.dim,)
    if agg.weights is not None:
        assert bool((agg.weights >= 0).all())
        assert float(agg.weights.sum()) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_every_defense_runs_one_round_end_to_end(name: str) -> None:
    cfg = make_experiment(
        dataset="synthetic",
        synthetic_train_size=900,
        synthetic_test_size=100,
        num_clients=7,
        gamma=0.15,
        rounds=1,
        baseline_local_epochs=1,
        fltrust_public_epochs=1,
        batch_size=32,
        defense=name,
        device="cpu",
        finetune_broadcast=True,  # Finetuning's evaluated model is then the global one, as for every other defense
    )
    sim = Simulation(cfg)
    initial = sim.global_state.clone()
    result = sim.run()
    record = result.records[0]
    assert torch.isfinite(result.global_state).all()
    assert not torch.equal(result.global_state, initial), "the round left the global model unchanged"
    # the record describes the model the defense returned, evaluated by a separately built run of the same config
    again = Simulation(cfg).evaluate(result.global_state)
    for key in ("accuracy", "asr_all", "asr_excl_target"):
        assert record[key] == again[key], key
    assert set(record["accepted"]) <= set(record["participants"]) == set(range(7))
    if len(record["accepted"]) < len(record["participants"]):
        # m = ⌊0.15 · 7⌋ = 1 malicious client, the last id
        assert record["detection"] == detection_scores(record["accepted"], range(7), [6])
    else:
        assert "detection" not in record


def test_every_builtin_defense_declares_its_options_next_to_it() -> None:
    """Adding a defense touches its file and its registry line: the configuration composes it from the options it
    declares, so every built-in one with options has ``options_type`` and its keys are configuration fields."""
    from spmc.config import Experiment
    from spmc.options import option_specs

    for name, cls in DEFENSES.items():
        if not cls.__module__.startswith("spmc.defenses.") or getattr(cls, "options_type", None) is None:
            continue
        for spec in option_specs(cls.options_type):
            assert spec.key in Experiment.model_fields, (name, spec.key)


@pytest.mark.parametrize("name", NAMES)
def test_default_options_are_those_of_the_default_experiment(name: str) -> None:
    """``DEFENSES[name]()`` (the Python API of docs/usage.md) is the defense a default configuration builds."""
    plain = DEFENSES[name]()
    composed = build_defense(make_experiment(defense=name))
    assert type(plain) is type(composed)
    assert vars(plain) == vars(composed)


@pytest.mark.parametrize("name", NAMES)
def test_options_are_a_frozen_dataclass(name: str) -> None:
    options = vars(build_defense(make_experiment(defense=name)))["options"]
    assert dataclasses.is_dataclass(options)
    first = dataclasses.fields(options)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(options, first, getattr(options, first))


def test_no_defense_or_attack_module_imports_the_config() -> None:
    """config.py composes the defenses and attacks; nothing below it imports it (no import cycle)."""
    root = Path(__file__).resolve().parents[1] / "src" / "spmc"
    offenders = []
    for path in sorted([*root.glob("defenses/*.py"), *root.glob("attacks/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "spmc.config" or n.startswith("spmc.config.") for n in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_stateful_protocol() -> None:
    assert isinstance(FoolsGold(), Stateful)
    assert not isinstance(Krum(), Stateful)
    stateful = [name for name, cls in DEFENSES.items() if isinstance(cls(), Stateful)]
    assert stateful == ["foolsgold", "centered_clip", "bucketing", "fldetector"]
