"""``constrain_scale`` (ATTACKS.md §A4): the penalised gradient and the scaling by hand, the parameter mask, options,
both engines agree, the effect on a run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from spmc import make_experiment
from spmc.attacks import ATTACKS, CraftingInputs
from spmc.attacks.constrain_scale import ConstrainScale, ConstrainScaleOptions
from spmc.config import build_attack
from spmc.params import ParamLayout
from spmc.threat import ThreatModel

from ._training import assert_same, both_engines, simulation, update_norm


def test_registry_and_defaults() -> None:
    assert ATTACKS["constrain_scale"] is ConstrainScale and ConstrainScale.hooks == {"training", "crafting"}
    plan = build_attack(make_experiment(update_attack="constrain_scale", num_clients=10, gamma=0.3))
    attack = plan.update
    assert isinstance(attack, ConstrainScale) and attack.options == ConstrainScaleOptions(0.7, None)
    assert attack.alpha == 0.7 and attack.gamma == pytest.approx(10 / 3)  # Γ = K/m
    assert ConstrainScale(threat=ThreatModel(num_clients=8, gamma=0.0)).gamma == 8.0  # m = 0: Γ = K


def test_gradient_by_hand() -> None:
    # α·g + (1 − α)·2·(θ − θ_g) = 0.7·(1, 2) + 0.6·(2, 0) = (1.9, 1.4); second row: 0.7·(−1, 0) + 0.6·(0, −2)
    attack = ConstrainScale(options=ConstrainScaleOptions(0.7))
    grad = torch.tensor([[1.0, 2.0], [-1.0, 0.0]])
    rows = torch.tensor([[3.0, 1.0], [1.0, -1.0]])
    out = attack.gradient(grad.clone(), rows, torch.tensor([1.0, 1.0]))
    assert torch.allclose(out, torch.tensor([[1.9, 1.4], [-0.7, -1.2]]))
    # α = 1 is plain training
    assert torch.equal(ConstrainScale(options=ConstrainScaleOptions(1.0)).gradient(grad, rows, torch.ones(2)), grad)


def test_penalty_acts_on_parameters_only() -> None:
    layout = ParamLayout.from_module(nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1)))
    attack = ConstrainScale(options=ConstrainScaleOptions(0.5))
    attack.bind(layout)
    rows = torch.ones(1, layout.dim)
    out = attack.gradient(torch.zeros(1, layout.dim), rows, torch.zeros(layout.dim))
    params = layout.param_mask()
    assert torch.equal(out[0, params], torch.ones(int(params.sum())))  # 0.5·0 + 0.5·2·1
    assert torch.equal(out[0, ~params], torch.zeros(int((~params).sum())))  # BatchNorm statistics and counter


def test_scaling_by_hand() -> None:
    attack = ConstrainScale(options=ConstrainScaleOptions(scale_factor=2.0))
    g = torch.tensor([1.0, 1.0])
    states = torch.tensor([[2.0, 3.0], [1.0, 0.5]])
    crafted = attack.craft(CraftingInputs(0, g, states, (2, 3), torch.zeros(0, 2), ()))
    assert torch.equal(crafted, torch.tensor([[3.0, 5.0], [1.0, 0.0]]))  # θ_g + 2·(θ − θ_g)
    # integer counters (a bound layout with BatchNorm) are left as trained
    layout = ParamLayout.from_module(nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1)))
    attack.bind(layout)
    ints = layout.int_mask()
    states = torch.ones(1, layout.dim) * 3
    crafted = attack.craft(CraftingInputs(0, torch.ones(layout.dim), states, (3,), torch.zeros(0, layout.dim), ()))
    assert torch.equal(crafted[0, ints], states[0, ints]) and torch.equal(crafted[0, ~ints], torch.full((6,), 5.0))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"alpha": 0.0}, r"^cs_alpha: got 0.0; must be a number in \(0, 1\]$"),
        ({"alpha": 1.5}, "cs_alpha: got 1.5"),
        ({"alpha": math.nan}, "cs_alpha: got nan"),
        ({"alpha": True}, "cs_alpha: got True"),
        ({"scale_factor": 0.0}, r"^scale_factor: got 0.0; must be a finite number > 0 or None \(K/m\)$"),
        ({"scale_factor": -1.0}, "scale_factor: got -1.0"),
        ({"scale_factor": math.inf}, "scale_factor: got inf"),
    ],
)
def test_options_are_validated(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConstrainScaleOptions(**values)  # type: ignore[arg-type]


def test_both_engines_agree() -> None:
    attack = ConstrainScale(options=ConstrainScaleOptions(0.3))
    sim = simulation(attack)
    sequential, batched = both_engines(sim, 0)
    assert_same(sequential, batched)
    plain = simulation(None)
    unpenalised = {r.client_id: r.state for r in both_engines(plain, 0)[0]}
    for r in sequential:  # the penalty changes the attackers' training only
        same = torch.equal(r.state, unpenalised[r.client_id])
        assert same == (r.client_id not in sim.data.malicious), r.client_id


def test_constrain_scale_boosts_the_attackers_in_a_run() -> None:
    """Effect on a run: the attackers' sent updates are Γ = K/m = 2 times their (constrained) trained updates."""
    sim = simulation(ConstrainScale(threat=ThreatModel(num_clients=4, gamma=0.5)))
    ids = sim.participants(0)
    sim.federation.prepare_round(0, sim.global_state, ids)
    start = sim.global_state.clone()
    results = sim.engine.train_round(start, sim.tasks(0, ids))
    outcome = sim.core.step(0, [r.state for r in results], ids, [1.0] * len(ids))
    assert outcome.states is not None
    for sent, r in zip(outcome.states, results):
        if r.client_id in sim.data.malicious:
            assert torch.allclose(sent - start, 2.0 * (r.state - start), atol=1e-6)
            assert update_norm(sent, start) > 1.5 * update_norm(r.state, start)
        else:
            assert torch.equal(sent, r.state)
