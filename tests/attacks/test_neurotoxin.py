"""``neurotoxin`` (ATTACKS.md §A4): the top-k coordinates by hand, the mask zeroes exactly them (none in round 0),
the PGD projection, options, both engines agree, the effect on a run, its state across a resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from spmc import make_experiment
from spmc.attacks import ATTACKS
from spmc.attacks.neurotoxin import Neurotoxin, NeurotoxinOptions, top_coordinates
from spmc.attacks.pgd import PGD
from spmc.config import build_attack
from spmc.params import ParamLayout
from spmc.simulation import Simulation
from spmc.store import RunDirError

from ._training import SMALL, assert_same, both_engines, simulation


def test_registry_and_defaults() -> None:
    assert ATTACKS["neurotoxin"] is Neurotoxin and Neurotoxin.hooks == {"training", "crafting"}
    assert issubclass(Neurotoxin, PGD)  # the paper's projection (Alg. 1 l. 9)
    attack = build_attack(make_experiment(update_attack="neurotoxin")).update
    assert isinstance(attack, Neurotoxin) and attack.options == NeurotoxinOptions(0.05, None)


def test_top_coordinates_by_hand() -> None:
    delta = torch.tensor([0.1, -5.0, 0.3, 2.0, 0.0])
    assert sorted(top_coordinates(delta, 0.4).tolist()) == [1, 3]  # ⌊0.4·5⌋ = 2 largest |Δ|
    assert top_coordinates(delta, 0.1).numel() == 0  # ⌊0.5⌋ = 0
    mask = torch.tensor([True, False, True, True, True])  # coordinate 1 is no parameter
    assert sorted(top_coordinates(delta, 0.5, mask).tolist()) == [2, 3]  # ⌊0.5·4⌋ = 2 among the parameters


def test_mask_zeroes_exactly_the_top_coordinates_and_none_in_round_0() -> None:
    attack = Neurotoxin(options=NeurotoxinOptions(0.4))
    g0 = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    grad = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    attack.observe(0, g0)
    assert attack.masked is None and torch.equal(attack.gradient(grad, grad, g0), grad)  # round 0: no mask
    g1 = g0 + torch.tensor([0.1, -5.0, 0.3, 2.0, 0.0])
    attack.observe(1, g1)
    out = attack.gradient(grad, grad, g1)
    top = [1, 3]
    assert torch.equal(out[:, top], torch.zeros(2, 2))
    rest = [0, 2, 4]
    assert torch.equal(out[:, rest], grad[:, rest])  # untouched, bit for bit
    assert bool((grad[:, top] != 0).all())  # the input rows are not modified
    attack.observe(1, g1 + 100.0)  # a repeated round is ignored (several partitions in one Flower process)
    assert sorted(attack.masked.tolist()) == top  # type: ignore[union-attr]
    attack.observe(3, g1 + torch.tensor([0.0, 0.0, 9.0, 0.0, -7.0]))  # from the last observed round (1)
    assert sorted(attack.masked.tolist()) == [2, 4]  # type: ignore[union-attr]


def test_mask_covers_parameters_only() -> None:
    layout = ParamLayout.from_module(nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1)))
    attack = Neurotoxin(options=NeurotoxinOptions(0.5))
    attack.bind(layout)
    attack.observe(0, torch.zeros(layout.dim))
    attack.observe(1, torch.arange(layout.dim, dtype=torch.float32))  # buffers last: the largest Δ
    params = layout.param_mask()
    masked = attack.masked
    assert masked is not None and masked.numel() == int(params.sum()) // 2 and bool(params[masked].all())


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"topk": 1.0}, r"^neurotoxin_topk: got 1.0; must be a fraction in \[0, 1\)$"),
        ({"topk": -0.1}, "neurotoxin_topk: got -0.1"),
        ({"topk": math.nan}, "neurotoxin_topk: got nan"),
        ({"eps": 0.0}, "pgd_eps: got 0.0"),
    ],
)
def test_options_are_validated(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NeurotoxinOptions(**values)  # type: ignore[arg-type]


def test_both_engines_agree_and_the_attackers_leave_the_top_coordinates_alone() -> None:
    """Round 1 (after one real round): the engines agree; the attackers' states equal θ_g^1 on the masked
    coordinates, which the benign clients — and the attackers of a run without the attack — move."""
    moved = {}
    for name in ("none", "neurotoxin"):
        attack = Neurotoxin(options=NeurotoxinOptions(0.3)) if name == "neurotoxin" else None
        sim = simulation(attack, weight_decay=0.0)
        sim.run_round(0)
        sequential, batched = both_engines(sim, 1)
        assert_same(sequential, batched)
        if attack is None:
            results = sequential
            continue
        masked = attack.masked
        assert masked is not None and masked.numel() == int(0.3 * sim.layout.num_params)
        start = sim.global_state
        for r in sequential + batched:
            moved[(name, r.client_id)] = float((r.state[masked] != start[masked]).float().mean())
        for r in results:  # the same clients without the attack, masked coordinates of this run
            moved[("none", r.client_id)] = float((r.state[masked] != start[masked]).float().mean())
    for k in (2, 3):  # the attackers
        assert moved[("neurotoxin", k)] == 0.0 and moved[("none", k)] > 0.5
    for k in (0, 1):
        assert moved[("neurotoxin", k)] > 0.5


def test_state_survives_a_resume(tmp_path: Path) -> None:
    cfg = make_experiment(**{**SMALL, "rounds": 3, "update_attack": "neurotoxin", "weight_decay": 0.0})
    reference = Simulation(cfg, tmp_path / "a").run()

    def stop_after_round_1(record: dict[str, object]) -> None:
        if record["round"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Simulation(cfg, tmp_path / "b").run(stop_after_round_1)
    payload = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    state = payload["attack_state"]
    assert int(state["update.seen_round"]) == 1 and state["update.seen_state"].shape == reference.global_state.shape
    assert float(state["update.eps"]) > 0
    resumed = Simulation(cfg, tmp_path / "b").run(resume=True)
    assert resumed.global_state.equal(reference.global_state)
    # the state matters: the same resume without it (no mask, no ε in round 2) ends elsewhere
    sim = Simulation(cfg)
    sim.restore({**payload, "attack_state": None})
    sim.run_round(2)
    assert not sim.global_state.equal(reference.global_state)


@pytest.mark.parametrize(
    "state",
    [
        {"update.seen_round": torch.tensor(1), "update.seen_state": torch.ones(3)},
        {"update.seen_round": torch.tensor(1)},
        {"update.seen_round": torch.tensor(1.5), "update.seen_state": torch.ones(3)},
        {"update.eps": torch.tensor(-1.0)},
        {"data.trigger": torch.ones(2)},
        {"elsewhere.x": torch.ones(1)},
        "not a mapping",
    ],
)
def test_a_hostile_checkpointed_state_is_refused(tmp_path: Path, state: object) -> None:
    cfg = make_experiment(**{**SMALL, "update_attack": "neurotoxin"})
    sim = Simulation(cfg)
    payload = sim.checkpoint(1)
    with pytest.raises(RunDirError, match="does not fit this run"):
        sim.restore({**payload, "attack_state": state})


def test_the_attack_observes_every_round_even_outside_attack_rounds() -> None:
    attack = Neurotoxin()
    sim = simulation(attack, attack_start=1, rounds=3)
    sim.run_round(0)  # no attack round: the attackers train clean, but θ_g^0 is seen
    assert attack.seen_round == 0 and attack.masked is None
    sim.federation.prepare_round(1, sim.global_state, sim.participants(1))
    assert attack.seen_round == 1 and attack.masked is not None
