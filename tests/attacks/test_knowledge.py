"""The attackers' knowledge and the schedule/pool guarantees of ATTACKS.md §A1.

``attacker_knowledge = partial``: each attacker of an attack round also trains a clean model on its clean data and
the crafting step sees only those (never a benign client's state), on both engines and over Flower; outside its
attack rounds an attacker trains exactly like a benign client; the random attacker pool is seeded and survives a
resume. The crafting attack is defined here (θ_g + the mean benign update), so nothing depends on the suite's."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc import make_experiment
from spmc.attacks import ATTACKS, Attack, Crafter, CraftingInputs
from spmc.attacks.base import Hook
from spmc.federation import SEED_CLIENT, SEED_SHADOW, derive_seed
from spmc.simulation import Simulation
from spmc.training import ClientResult, ClientTask

MEAN = "test-benign-mean"
SMALL = {
    "dataset": "synthetic",
    "synthetic_train_size": 320,
    "synthetic_test_size": 50,
    "num_clients": 4,
    "gamma": 0.5,  # attackers 2 and 3 (fixed pool)
    "rounds": 2,
    "baseline_local_epochs": 1,
    "batch_size": 32,
    "device": "cpu",
    "engine": "batched",
    "kernel": "torch",
}


class BenignMean(Attack):
    """Crafting hook: every attacker sends θ_g + mean_i (b_i − θ_g) over the benign states it is shown (its own
    state when it is shown none). It reads nothing but ``inputs``."""

    name: ClassVar[str] = MEAN
    description: ClassVar[str] = "θ_g + the mean benign update (a test attack)"
    hooks: ClassVar[frozenset[Hook]] = frozenset({"crafting"})
    seen: ClassVar[list[CraftingInputs]] = []

    def craft(self, inputs: CraftingInputs) -> torch.Tensor:
        BenignMean.seen.append(inputs)
        if inputs.benign_states.shape[0] == 0:
            return inputs.attacker_states
        mean = (inputs.benign_states - inputs.global_state).mean(dim=0)
        return (inputs.global_state + mean).expand_as(inputs.attacker_states).clone()


class CleanHungry(BenignMean):
    """The same, asking for the attackers' clean models under full knowledge too."""

    needs_clean: ClassVar[bool] = True


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(ATTACKS, MEAN, BenignMean)
    BenignMean.seen = []
    yield
    BenignMean.seen = []


def simulation(**overrides: object) -> Simulation:
    values = {**SMALL, "update_attack": MEAN, "attacker_knowledge": "partial", **overrides}
    return Simulation(make_experiment(**values))


def train(sim: Simulation, t: int) -> tuple[list[int], list[ClientResult], dict[int, torch.Tensor]]:
    """Round ``t``'s participants, their trained states and the attackers' clean shadows (one engine call)."""
    fed = sim.federation
    ids = sim.participants(t)
    shadow_tasks = [fed.shadow_task(t, k, sim.teachers[k]) for k in fed.shadow_ids(t, ids)]
    trained = sim.engine.train_round(sim.global_state, sim.tasks(t, ids) + shadow_tasks)
    return ids, trained[: len(ids)], {r.client_id: r.state for r in trained[len(ids) :]}


# ------------------------------------------------------------------------------------ the crafting step, by hand


def test_partial_crafting_sees_only_the_attackers_clean_models() -> None:
    g = torch.zeros(2)
    states = [torch.tensor([1.0, 1.0]), torch.tensor([10.0, 0.0]), torch.tensor([2.0, 2.0]), torch.tensor([3.0, 0.0])]
    clean = {1: torch.tensor([4.0, 2.0]), 3: torch.tensor([0.0, 6.0]), 0: torch.tensor([99.0, 99.0])}  # 0 is benign
    crafter = Crafter(BenignMean(), frozenset({1, 3}), knowledge="partial")
    out = crafter(0, g, states, [0, 1, 2, 3], clean)
    (inputs,) = BenignMean.seen
    assert inputs.benign_ids == () and inputs.attacker_ids == (1, 3)
    assert inputs.benign_states.tolist() == [[4.0, 2.0], [0.0, 6.0]]  # the attackers' shadows, nobody else's
    assert inputs.clean_states is not None and inputs.clean_states.tolist() == [[4.0, 2.0], [0.0, 6.0]]
    assert [s.tolist() for s in out] == [[1.0, 1.0], [2.0, 4.0], [2.0, 2.0], [2.0, 4.0]]  # mean (4,2),(0,6) = (2,4)
    poisoned = [torch.full((2,), math.nan), states[1], torch.full((2,), 1e30), states[3]]
    assert [s.tolist() for s in crafter(0, g, poisoned, [0, 1, 2, 3], clean)][1::2] == [[2.0, 4.0], [2.0, 4.0]]


def test_full_crafting_reads_the_benign_states_and_clean_models_only_when_asked() -> None:
    g = torch.zeros(2)
    states = [torch.tensor([1.0, 1.0]), torch.tensor([10.0, 0.0]), torch.tensor([3.0, 5.0]), torch.tensor([3.0, 0.0])]
    clean = {1: torch.tensor([4.0, 2.0]), 3: torch.tensor([0.0, 6.0])}
    out = Crafter(BenignMean(), frozenset({1, 3}))(0, g, states, [0, 1, 2, 3], clean)
    assert out[1].tolist() == [2.0, 3.0] and BenignMean.seen[-1].benign_ids == (0, 2)  # mean of (1,1), (3,5)
    assert BenignMean.seen[-1].clean_states is not None  # given, it is passed on
    out = Crafter(BenignMean(), frozenset({1, 3}))(0, g, [torch.full((2,), math.nan), *states[1:]], [0, 1, 2, 3])
    assert math.isnan(float(out[1][0]))  # full knowledge does read benign client 0: the test above can fail
    assert BenignMean.seen[-1].clean_states is None


@settings(max_examples=30, deadline=None)
@given(
    bad=st.sets(st.integers(0, 5), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    junk=st.sampled_from([math.nan, math.inf, -1e30, 0.0]),
)
def test_partial_output_never_depends_on_benign_states(bad: set[int], seed: int, junk: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    ids = list(range(6))
    states = list(torch.randn(6, 5, generator=gen))
    clean = {k: torch.randn(5, generator=gen) for k in bad}
    crafter = Crafter(BenignMean(), frozenset(bad), knowledge="partial")
    g = torch.randn(5, generator=gen)
    reference = crafter(1, g, states, ids, clean)
    poisoned = [s if k in bad else torch.full_like(s, junk) for k, s in zip(ids, states)]
    again = crafter(1, g, poisoned, ids, clean)
    assert all(torch.equal(reference[k], again[k]) for k in bad)  # the benign rows are passed on as they came
    expected = g + (torch.stack([clean[k] for k in sorted(bad)]) - g).mean(dim=0)
    assert all(torch.allclose(reference[k], expected) for k in bad)


# ----------------------------------------------------------------------------------------------- in a real run


def test_partial_round_never_reads_a_benign_clients_state() -> None:
    """ServerCore.step with the trained states: blowing the benign states up (or making them NaN) leaves the
    crafted attackers' states unchanged under partial, and changes them under full."""
    for knowledge, scales in (("partial", (1.0, 1e3, math.nan)), ("full", (1.0, 1e3))):
        sim = simulation(attacker_knowledge=knowledge)
        ids, results, shadows = train(sim, 0)
        assert sorted(shadows) == ([2, 3] if knowledge == "partial" else [])
        start = sim.global_state.clone()
        crafted = []
        for scale in scales:
            sim.core.global_state = start
            states = [r.state if k in (2, 3) else start + scale * (r.state - start) for k, r in zip(ids, results)]
            outcome = sim.core.step(0, states, ids, [1.0] * len(ids), shadows or None)
            assert outcome.states is not None
            crafted.append(torch.stack([outcome.states[outcome.kept_ids.index(k)] for k in (2, 3)]))
        for other in crafted[1:]:
            assert torch.equal(crafted[0], other) == (knowledge == "partial"), knowledge
        if knowledge == "partial":
            expected = start + (torch.stack([shadows[2], shadows[3]]) - start).mean(dim=0)
            assert torch.allclose(crafted[0][0], expected, atol=1e-6)


def test_shadows_are_clean_benign_training_and_stay_out_of_the_defense_and_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = simulation(attack_start=1)
    fed = sim.federation
    assert fed.shadow_ids(0, [0, 1, 2, 3]) == [] and fed.shadow_ids(1, [0, 1, 2, 3]) == [2, 3]
    task = fed.shadow_task(1, 3, sim.teachers[3])
    assert task.data is sim.data.clean[3] and task.training is None and task.method == sim.cfg.client
    assert task.seed == derive_seed(0, SEED_SHADOW, 1, 3) != derive_seed(0, SEED_CLIENT, 1, 3)
    calls: list[int] = []
    engine_round = sim.engine.train_round

    def counted(start: torch.Tensor, tasks: list[ClientTask]) -> list[ClientResult]:
        calls.append(len(tasks))
        return engine_round(start, tasks)

    aggregated: list[int] = []
    aggregate = sim.defense.aggregate
    monkeypatch.setattr(sim.engine, "train_round", counted)
    monkeypatch.setattr(
        sim.defense, "aggregate", lambda inputs: aggregated.append(len(inputs.client_ids)) or aggregate(inputs)
    )
    records = sim.run().records
    assert calls == [4, 6]  # round 1: the two shadows are extra rows of the one batched call
    assert aggregated == [4, 4]
    assert all(sorted(r["client_loss"]) == ["0", "1", "2", "3"] and r["participants"] == [0, 1, 2, 3] for r in records)
    assert [inputs.round for inputs in BenignMean.seen] == [1]


def test_default_knowledge_trains_no_shadow_unless_the_attack_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    sim = simulation(attacker_knowledge="full")
    assert sim.federation.shadow_ids(0, [0, 1, 2, 3]) == []
    monkeypatch.setitem(ATTACKS, MEAN, CleanHungry)
    sim = simulation(attacker_knowledge="full", rounds=1)
    assert sim.federation.shadow_ids(0, [0, 1, 2, 3]) == [2, 3]
    sim.run()
    (inputs,) = BenignMean.seen
    assert inputs.benign_ids == (0, 1) and inputs.clean_states is not None and inputs.clean_states.shape[0] == 2


def test_partial_is_the_same_on_both_engines() -> None:
    runs = [simulation(engine=engine, rounds=1).run() for engine in ("batched", "sequential")]
    assert torch.allclose(runs[0].global_state, runs[1].global_state, atol=1e-5, rtol=1e-4)
    assert [r["accuracy"] for r in runs[0].records] == pytest.approx([r["accuracy"] for r in runs[1].records], abs=2.01)
    crafted = [seen.benign_states for seen in BenignMean.seen]
    assert len(crafted) == 2 and torch.allclose(crafted[0], crafted[1], atol=1e-5, rtol=1e-4)  # the shadows


# --------------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("engine", ["batched", "sequential"])
def test_an_attacker_outside_its_rounds_trains_exactly_like_a_benign_client(engine: str) -> None:
    """attack_start = 1: in round 0 the attackers' states equal those of the same clients in a run without attack
    (same data partition, same seeds); in round 1 they differ (poisoned data)."""
    attacked = Simulation(make_experiment(**{**SMALL, "engine": engine, "attack_start": 1, "poison_rate": 0.5}))
    clean = Simulation(make_experiment(**{**SMALL, "engine": engine, "attack": "none"}))
    assert attacked.data.malicious == (2, 3) and clean.data.malicious == ()
    assert torch.equal(attacked.global_state, clean.global_state)
    for t, same in ((0, True), (1, False)):
        a = attacked.engine.train_round(attacked.global_state, attacked.tasks(t, [1, 2, 3]))
        b = clean.engine.train_round(clean.global_state, clean.tasks(t, [1, 2, 3]))
        assert torch.equal(a[0].state, b[0].state)  # client 1 is benign either way
        for row in (1, 2):
            assert torch.equal(a[row].state, b[row].state) == same, (t, row)


# ------------------------------------------------------------------------------------------------ attacker pool


def test_random_pool_is_seeded_and_drives_the_run() -> None:
    pools = {seed: make_experiment(**SMALL, attacker_pool="random", seed=seed).malicious_ids for seed in range(8)}
    assert pools[5] == make_experiment(**SMALL, attacker_pool="random", seed=5).malicious_ids
    assert len(set(pools.values())) > 1 and any(p != (2, 3) for p in pools.values())
    seed = next(s for s, p in pools.items() if p != (2, 3))
    sim = simulation(attacker_pool="random", seed=seed, rounds=1)
    assert sim.data.malicious == pools[seed] and sorted(sim.data.clean) == list(pools[seed])
    crafter = sim.core.crafter
    assert isinstance(crafter, Crafter) and crafter.attackers == frozenset(pools[seed])
    assert sim.federation.shadow_ids(0, [0, 1, 2, 3]) == list(pools[seed])


def test_random_pool_and_partial_knowledge_survive_a_resume(tmp_path: Path) -> None:
    seed = next(s for s in range(8) if make_experiment(**SMALL, attacker_pool="random", seed=s).malicious_ids != (2, 3))
    cfg = make_experiment(
        **{
            **SMALL,
            "update_attack": MEAN,
            "attacker_knowledge": "partial",
            "attacker_pool": "random",
            "seed": seed,
            "rounds": 3,
        }
    )
    reference = Simulation(cfg, tmp_path / "a").run()

    def stop_after_round_1(record: dict[str, object]) -> None:
        if record["round"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Simulation(cfg, tmp_path / "b").run(stop_after_round_1)
    resumed_sim = Simulation(cfg, tmp_path / "b")
    assert list(resumed_sim.data.malicious) == reference.summary["malicious_ids"] == list(cfg.malicious_ids)
    resumed = resumed_sim.run(resume=True)
    assert resumed.summary["malicious_ids"] == reference.summary["malicious_ids"]
    assert [r["accuracy"] for r in resumed.records] == [r["accuracy"] for r in reference.records]
    assert resumed.global_state.equal(reference.global_state)


def test_partial_knowledge_is_accepted_by_the_configuration() -> None:
    cfg = make_experiment(**SMALL, update_attack=MEAN, attacker_knowledge="partial")
    assert cfg.attacker_knowledge == "partial" and Simulation(cfg).federation.attack.knowledge == "partial"


def test_partial_through_the_cli_and_as_a_sweep_axis(tmp_path: Path) -> None:
    from spmc import cli
    from spmc.sweep import expand_grid

    sets = [f'update_attack="{MEAN}"', 'attacker_knowledge="partial"', "attack_start=1", 'device="cpu"']
    argv = ["run", "--preset", "smoke", "--out", str(tmp_path / "run"), "-q"]
    assert cli.main([*argv, *(arg for s in sets for arg in ("--set", s))]) == 0
    assert (tmp_path / "run" / "summary.json").is_file()
    assert [inputs.round for inputs in BenignMean.seen] == [1] and BenignMean.seen[0].benign_ids == ()
    runs = expand_grid(
        {"base": {"preset": "smoke", "update_attack": MEAN}, "grid": {"attacker_knowledge": ["full", "partial"]}}
    )
    assert [r.options["attacker_knowledge"] for r in runs] == ["full", "partial"]
    assert len({r.name for r in runs}) == 2
