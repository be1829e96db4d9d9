"""``defense_aware`` (ATTACKS.md §A5): the scale γ found by calling a deep copy of the server's defense.

By hand: with FedAvg it finds ``scaling``'s Γ = K/m (W/W_M with sample counts) within the bisection's resolution,
under full and partial knowledge; against a plug-in defense defined here it finds the edge of its acceptance
region. Guarantees: the server's defense state (FoolsGold, FLDetector, centered clipping) and the global random
generators are bit-identical with and without the attack's calls; never more than ``da_max_calls`` calls; under
``partial`` the benign states are never read; it runs unchanged against every registered defense; the chosen γ
differs per defense and lands in the round's record, on both engines, over the CLI and in the Flower strategy."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc import make_experiment
from spmc.attacks import ATTACKS, Crafter
from spmc.attacks.defense_aware import DefenseAware, DefenseAwareOptions
from spmc.cli import main
from spmc.config import build_attack
from spmc.defenses import DEFENSES, Aggregate, FedAvg, FedAvgOptions, RoundInputs, Stateful
from spmc.params import ParamLayout
from spmc.server import RoundOutcome, ServerCore
from spmc.sweep import expand_grid
from spmc.threat import ThreatModel

D = 6
LAYOUT = ParamLayout.from_module(torch.nn.Linear(5, 1))  # 6 float parameters


def attack(num_clients: int = 10, gamma: float = 0.3, **options: Any) -> DefenseAware:
    a = DefenseAware(options=DefenseAwareOptions(**options), threat=ThreatModel(num_clients, gamma))
    a.bind(LAYOUT)
    return a


def round_states(n: int, bad: set[int], seed: int = 0, spread: float = 0.1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """θ_g and n states: benign ones θ_g + a small common step + noise, attackers' θ_g + e_0 (the backdoor)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(D, generator=gen, dtype=torch.float64)
    step = 0.05 * torch.randn(D, generator=gen, dtype=torch.float64)
    states = []
    for k in range(n):
        if k in bad:
            states.append(g + torch.eye(D, dtype=torch.float64)[0] + 0.01 * torch.randn(D, generator=gen))
        else:
            states.append(g + step + spread * torch.randn(D, generator=gen, dtype=torch.float64))
    return g, states


def step(
    defense: Any,
    a: DefenseAware,
    n: int,
    bad: set[int],
    knowledge: str = "full",
    counts: list[float] | None = None,
    **kw: Any,
) -> tuple[ServerCore, RoundOutcome]:
    """One server round (crafting → defense) over ``round_states``: the server core and the round's outcome."""
    g, states = round_states(n, bad, **kw)
    crafter = Crafter(a, frozenset(bad), knowledge="partial" if knowledge == "partial" else "full")
    core = ServerCore(defense, LAYOUT, g, crafter=crafter)
    ids = list(range(n))
    clean = {k: g + 0.05 * (k + 1) * torch.ones(D, dtype=torch.float64) for k in bad}
    return core, core.step(0, states, ids, counts or [1.0] * n, clean)


# ----------------------------------------------------------------------------------------------- registry, options


def test_registry_options_and_hooks() -> None:
    assert ATTACKS["defense_aware"] is DefenseAware
    assert DefenseAware.hooks == {"crafting"} and DefenseAware.carries_backdoor and not DefenseAware.targeted
    plan = build_attack(make_experiment(update_attack="defense_aware", da_max_calls=12, da_grid_max_exp=3))
    assert isinstance(plan.update, DefenseAware) and plan.update.options == DefenseAwareOptions(-4, 3, 12)
    assert DefenseAwareOptions().grid == [2.0**e for e in range(-4, 7)]


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"grid_min_exp": 1.5}, "da_grid_min_exp"),
        ({"grid_min_exp": True}, "da_grid_min_exp"),
        ({"grid_max_exp": 99}, "da_grid_max_exp"),
        ({"grid_min_exp": 2, "grid_max_exp": 1}, "da_grid_max_exp"),
        ({"max_calls": 1}, "da_max_calls"),
        ({"max_calls": "24"}, "da_max_calls"),
    ],
)
def test_options_are_validated(values: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=rf"^{key}: got "):
        DefenseAwareOptions(**values)


# ------------------------------------------------------------------------------------------------------ by hand


@pytest.mark.parametrize(("n", "bad"), [(10, {7, 8, 9}), (10, {9}), (5, {1, 3}), (4, {0, 1, 2, 3})])
def test_fedavg_finds_scalings_gamma_k_over_m(n: int, bad: set[int]) -> None:
    """FedAvg, uniform counts: D(γ) = m·γ·‖δ‖/n, so γ* = n/m (all attackers: 1), within the bisection's step."""
    a = attack(n, min(len(bad) / n, 0.75))  # the threat model only serves partial knowledge
    core, last = step(DEFENSES["fedavg"](), a, n, bad)
    diag = last.crafting
    expected = n / len(bad)
    assert expected <= diag["da_gamma"] <= expected * (1 + 2**-9), diag
    assert diag["da_calls"] <= 24 and diag["da_displacement"] >= 1.0
    # every attacker sent θ_g + μ_B + γ·δ
    g, states = round_states(n, bad)
    benign = [s for k, s in enumerate(states) if k not in bad]
    mu = torch.stack(benign).mean(0) - g if benign else torch.zeros(D, dtype=torch.float64)
    delta = torch.stack([states[k] for k in sorted(bad)]).mean(0) - g
    sent = last.states
    for k in bad:
        assert torch.allclose(sent[k], g + mu + diag["da_gamma"] * delta, atol=1e-12)
    # the new global model: the benign average plus (about) the whole backdoor (model replacement)
    moved = float((core.global_state - (g + mu)) @ delta / delta.norm())
    assert moved == pytest.approx(float(delta.norm()), rel=2**-8)


def test_fedavg_with_sample_counts_finds_w_over_w_m() -> None:
    """fedavg_weighting = samples: D(γ) = γ·‖δ‖·W_M/W, so γ* = W/W_M (the sample counts reach the copy)."""
    counts = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]  # attackers 4, 5: W_M = 110 of W = 210
    a = attack(6, 0.34)
    _, last = step(FedAvg(FedAvgOptions("samples")), a, 6, {4, 5}, counts=counts)
    assert 210 / 110 <= last.crafting["da_gamma"] <= 210 / 110 * (1 + 2**-9)


def test_partial_knowledge_replicates_the_clean_estimates_to_k_minus_m() -> None:
    """partial: the benign set is the attackers' clean models standing for the run's K − m clients: γ* = K/m."""
    a = attack(10, 0.3)
    _, last = step(DEFENSES["fedavg"](), a, 10, {7, 8, 9}, knowledge="partial")
    assert 10 / 3 <= last.crafting["da_gamma"] <= 10 / 3 * (1 + 2**-9)


class NormGate:
    """A third-party defense, defined only here: the mean of the states whose update norm is ≤ τ; ValueError when
    none is (the round is refused). It also draws from the global torch generator, as a careless plug-in may."""

    name: ClassVar[str] = "test-norm-gate"
    description: ClassVar[str] = "mean of the updates with norm <= tau (a test plug-in)"
    needs_server_data: ClassVar[bool] = False

    def __init__(self, tau: float = 2.5) -> None:
        self.tau = tau
        self.calls = 0

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        self.calls += 1
        torch.rand(1)
        keep = torch.linalg.vector_norm(inputs.updates, dim=1) <= self.tau
        if not bool(keep.any()):
            raise ValueError("test-norm-gate: every update is too long")
        ids = tuple(k for k, ok in zip(inputs.client_ids, keep.tolist()) if ok)
        return Aggregate(inputs.client_states[keep].mean(0), accepted=ids)


def test_a_plug_in_defense_gets_the_edge_of_its_acceptance_region() -> None:
    """Benign states = θ_g, one attacker of four with δ = e_0 (norm 1), τ = 2.5: D(γ) = γ/4 while γ ≤ 2.5, else
    0; ‖δ‖ is never reached, so γ* is the largest accepted scale, found from below by the pattern search."""
    g = torch.zeros(D, dtype=torch.float64)
    states = [g.clone() for _ in range(3)] + [torch.eye(D, dtype=torch.float64)[0]]
    gate = NormGate(2.5)
    core = ServerCore(gate, LAYOUT, g, crafter=Crafter(attack(4, 0.25), frozenset({3})))
    rng = torch.get_rng_state()
    outcome = core.step(0, states, [0, 1, 2, 3], [1.0] * 4)
    assert gate.calls == 1  # the server's own call only: every candidate went to a copy
    diag = outcome.crafting
    assert 2.3 < diag["da_gamma"] <= 2.5 and diag["da_displacement"] == pytest.approx(diag["da_gamma"] / 4)
    assert diag["da_calls"] == 24
    assert outcome.accepted == [0, 1, 2, 3]  # the crafted state passes the gate
    after = torch.get_rng_state()
    torch.set_rng_state(rng)
    torch.rand(1)  # the server's own call drew once; the attack's 24 draws were undone
    assert torch.equal(after, torch.get_rng_state())


def test_a_defense_that_refuses_every_candidate_leaves_gamma_one() -> None:
    class Refuser(NormGate):
        def aggregate(self, inputs: RoundInputs) -> Aggregate:
            if inputs.client_states.shape[0] > 3:
                raise ValueError("refused")
            return super().aggregate(inputs)

    g, states = round_states(4, {3})
    crafter = Crafter(attack(4, 0.25), frozenset({3}))
    out = crafter(0, g, states, [0, 1, 2, 3], counts=[1.0] * 4, defense=Refuser(), make_inputs=_builder(g, 0))
    assert crafter.diagnostics["da_gamma"] == 1.0 and crafter.diagnostics["da_calls"] == 1
    assert math.isnan(crafter.diagnostics["da_displacement"]) and bool(torch.isfinite(out[3]).all())


def test_crafting_without_a_server_is_refused_clearly() -> None:
    g, states = round_states(4, {3})
    with pytest.raises(ValueError, match="defense_aware: the crafting step was given no defense"):
        Crafter(attack(4, 0.25), frozenset({3}))(0, g, states, [0, 1, 2, 3])


def _builder(g: torch.Tensor, t: int) -> Any:
    return ServerCore(DEFENSES["fedavg"](), LAYOUT, g).round_inputs_builder(t)


# --------------------------------------------------------------------------------------------------- guarantees


def snapshot(defense: Any) -> Any:
    if isinstance(defense, Stateful):
        return copy.deepcopy(defense.state_dict())
    return copy.deepcopy(vars(defense))


def identical(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return bool(a == b) or (a != a and b != b)


@pytest.mark.parametrize("name", ["foolsgold", "fldetector", "centered_clip"])
def test_the_servers_defense_state_is_bit_identical_with_and_without_the_attacks_calls(name: str) -> None:
    defense = DEFENSES[name]()
    bad = {7, 8, 9}
    core = ServerCore(defense, LAYOUT, round_states(10, bad)[0])
    for t in range(4):  # warm the defense up: history, window, centre
        _, states = round_states(10, bad, seed=t + 1)
        core.step(t, states, list(range(10)), [1.0] * 10)
    before = snapshot(defense)
    g, states = round_states(10, bad, seed=9)
    crafter = Crafter(attack(10, 0.3), frozenset(bad))
    crafter(4, core.global_state, states, list(range(10)), counts=[1.0] * 10, defense=defense,
            make_inputs=core.round_inputs_builder(4))  # fmt: skip
    assert crafter.diagnostics["da_calls"] >= 2
    assert identical(before, snapshot(defense))
    # the check can fail: one real call on the same round changes the state
    defense.aggregate(core.round_inputs_builder(4)(torch.stack(states), list(range(10)), torch.ones(10)))
    assert not identical(before, snapshot(defense))


class Counting:
    """Wraps a defense and counts its aggregate calls over all its deep copies."""

    calls: ClassVar[list[int]] = [0]

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = getattr(inner, "name", "wrapped")
        self.needs_server_data = inner.needs_server_data

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        Counting.calls[0] += 1
        result: Aggregate = self.inner.aggregate(inputs)
        return result


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(["fedavg", "krum", "median", "trimmed_mean", "test-norm-gate"]),
    max_calls=st.integers(2, 30),
    top=st.integers(-2, 8),
    seed=st.integers(0, 1000),
)
def test_never_more_than_da_max_calls(name: str, max_calls: int, top: int, seed: int) -> None:
    inner = NormGate(1.0) if name == "test-norm-gate" else DEFENSES[name]()
    Counting.calls[0] = 0
    a = attack(10, 0.3, max_calls=max_calls, grid_min_exp=-4, grid_max_exp=top)
    g, states = round_states(10, {7, 8, 9}, seed=seed)
    crafter = Crafter(a, frozenset({7, 8, 9}))
    crafter(0, g, states, list(range(10)), counts=[1.0] * 10, defense=Counting(inner), make_inputs=_builder(g, 0))
    assert Counting.calls[0] <= max_calls and crafter.diagnostics["da_calls"] == Counting.calls[0]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), junk=st.sampled_from([math.nan, math.inf, -1e30, 0.0, 1e3]))
def test_partial_knowledge_never_reads_a_benign_state(seed: int, junk: float) -> None:
    bad = {2, 5}
    g, states = round_states(6, bad, seed=seed)
    clean = {k: g + 0.1 * torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) for k in bad}
    poisoned = [s if k in bad else torch.full_like(s, junk) for k, s in enumerate(states)]
    outs = []
    for rows in (states, poisoned):
        crafter = Crafter(attack(6, 0.34), frozenset(bad), knowledge="partial")
        out = crafter(1, g, rows, list(range(6)), clean, counts=[1.0] * 6, defense=DEFENSES["median"](),
                      make_inputs=_builder(g, 1))  # fmt: skip
        outs.append((torch.stack([out[k] for k in sorted(bad)]), crafter.diagnostics))
    assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1]
    full = Crafter(attack(6, 0.34), frozenset(bad))
    out = full(
        1, g, poisoned, list(range(6)), counts=[1.0] * 6, defense=DEFENSES["median"](), make_inputs=_builder(g, 1)
    )
    assert not torch.equal(torch.stack([out[k] for k in sorted(bad)]), outs[0][0])  # full does read them


@pytest.fixture
def plug_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(DEFENSES, NormGate.name, NormGate)
    yield


@pytest.mark.usefixtures("plug_in")
@pytest.mark.parametrize("name", sorted(set(DEFENSES) | {NormGate.name}))
def test_it_runs_unchanged_against_every_registered_defense(name: str) -> None:
    """One round over every defense (the plug-in included): a γ on (or refined from) the grid, finite states, the
    budget kept, and the defense's state untouched."""
    from spmc.config import build_defense

    cfg = make_experiment(defense=name, update_attack="defense_aware", num_clients=10, gamma=0.3)
    try:
        defense = build_defense(cfg)
    except Exception as err:  # a defense whose configuration this synthetic round cannot give (server data)
        pytest.skip(f"{name}: {err}")
    if defense.needs_server_data:
        pytest.skip(f"{name} needs the server's data (fltrust is covered by the CLI run test)")
    before = snapshot(defense)
    g, states = round_states(10, {7, 8, 9})
    crafter = Crafter(attack(10, 0.3), frozenset({7, 8, 9}))
    out = crafter(0, g, states, list(range(10)), counts=[1.0] * 10, defense=defense, make_inputs=_builder(g, 0))
    diag = crafter.diagnostics
    assert 0 < diag["da_gamma"] <= 2.0**7 and diag["da_calls"] <= 24
    assert all(bool(torch.isfinite(s).all()) for s in out)
    assert identical(before, snapshot(defense))


def test_the_chosen_gamma_differs_per_defense() -> None:
    """fedavg: K/m; krum (picks one state): the malicious state is picked while it is closest to the others, so it
    only needs γ ≈ 1 (the whole δ in one pick); median: 3 identical rows of 10 cannot move the median by ‖δ‖."""
    chosen = {}
    for name in ("fedavg", "krum", "median", "spmc"):
        _, last = step(DEFENSES[name](), attack(10, 0.3), 10, {7, 8, 9}, spread=0.5)
        chosen[name] = last.crafting
    assert 10 / 3 <= chosen["fedavg"]["da_gamma"] <= 10 / 3 * (1 + 2**-9)
    assert chosen["krum"]["da_gamma"] == pytest.approx(1.0, rel=2**-8)
    assert chosen["median"]["da_displacement"] < 1.0
    assert len({round(c["da_gamma"], 6) for c in chosen.values()}) == 4, chosen


# ----------------------------------------------------------------------------------------------- runs, CLI, sweep

TINY = ["--preset", "smoke", "--rounds", "1", "-q", "--set", "kernel=torch", "--set", "synthetic_train_size=400"]
TINY += ["--set", "synthetic_test_size=20", "--set", "batch_size=32"]


@pytest.mark.parametrize(("defense", "engine"), [("fedavg", "batched"), ("fltrust", "sequential")])
def test_cli_run_records_the_chosen_gamma(tmp_path: Path, defense: str, engine: str) -> None:
    out = tmp_path / "run"
    args = ["--set", "update_attack=defense_aware", "--set", f"defense={defense}", "--set", f"engine={engine}"]
    assert main(["run", *TINY, *args, "--set", "da_max_calls=16", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["update_attack"] == "defense_aware" and config["da_max_calls"] == 16
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    crafting = record["crafting"]
    assert crafting["da_calls"] <= 16 and crafting["da_gamma"] > 0
    if defense == "fedavg":  # smoke: K = 4, m = 1
        assert 4.0 <= crafting["da_gamma"] <= 4.0 * (1 + 2**-6)


def test_a_bad_option_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = ["--set", "update_attack=defense_aware", "--set", "da_max_calls=1", "--out", str(out)]
    assert main(["run", *TINY, *args]) == 2
    printed = capsys.readouterr()
    assert [line for line in (printed.out + printed.err).splitlines() if "da_max_calls" in line], printed
    assert not out.exists()


def test_options_are_sweep_axes() -> None:
    spec = {
        "base": {"preset": "smoke", "update_attack": "defense_aware"},
        "grid": {"da_max_calls": [8, 24], "defense": ["median", "spmc"]},
    }
    runs = expand_grid(spec)
    pairs = {(r.options["da_max_calls"], r.options["defense"]) for r in runs}
    assert pairs == {(8, "median"), (8, "spmc"), (24, "median"), (24, "spmc")}
    for r in runs:
        plan = build_attack(make_experiment(update_attack="defense_aware", da_max_calls=r.options["da_max_calls"]))
        assert isinstance(plan.update, DefenseAware) and plan.update.options.max_calls == r.options["da_max_calls"]


# ---------------------------------------------------------------------------------------------------------- Flower


@pytest.mark.usefixtures("flower_task_identity")
@pytest.mark.parametrize("defense", ["median", "foolsgold"])
def test_the_flower_strategy_crafts_like_the_engine(defense: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Crafting acts in the strategy's ServerCore: on the same client states its global model and the recorded γ
    equal the simulation engine's (a stateful defense included)."""
    pytest.importorskip("flwr")
    from spmc.config import build_defense
    from spmc.flower import DefenseStrategy, arrays_to_state
    from spmc.simulation import Simulation
    from spmc.training import ClientResult

    from .test_crafting_flower import SMALL, reply

    cfg = make_experiment(**{**SMALL, "num_clients": 5, "gamma": 0.4}, update_attack="defense_aware", defense=defense)
    sim = Simulation(cfg)
    g = torch.Generator().manual_seed(2)
    states = {k: sim.global_state + 0.01 * torch.randn(sim.layout.dim, generator=g) for k in range(5)}
    monkeypatch.setattr(
        sim.engine,
        "train_round",
        lambda start, tasks: [ClientResult(t.client_id, states[t.client_id].clone(), 1.0, 1) for t in tasks],
    )
    strategy = DefenseStrategy(
        build_defense(cfg),
        sim.layout,
        send_teachers=False,
        initial_state=sim.global_state.clone(),
        crafter=build_attack(cfg).crafter(),
    )
    replies = [
        reply(sim.layout, states[k], node=700 - 13 * k, pid=k, num=sim.data.num_samples[k]) for k in (4, 1, 3, 0, 2)
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    record = sim.run_round(0)
    assert arrays is not None and metrics is not None
    assert torch.allclose(arrays_to_state(sim.layout, arrays), sim.global_state, atol=1e-7, rtol=0)
    assert record["crafting"]["da_calls"] <= 24
    assert float(metrics["crafting.da_gamma"]) == pytest.approx(record["crafting"]["da_gamma"], rel=1e-9)
