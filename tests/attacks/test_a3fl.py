"""``a3fl`` (ATTACKS.md §A3): the trigger optimised each attack round against θ_g and an unlearning copy."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from spmc import make_experiment
from spmc.attacks import ATTACKS, AttackSettings
from spmc.attacks.a3fl import A3FL, A3FLOptions
from spmc.federation import Federation
from spmc.simulation import Simulation
from spmc.threat import ThreatModel

from ._helpers import SMALL, asr_on, run

FAST = {"a3fl_samples": 64, "a3fl_trigger_epochs": 3}


def federation(**overrides: Any) -> Federation:
    fed = Federation.build(make_experiment(**{**SMALL, "attack": "a3fl", **FAST, **overrides}))
    attack = fed.attack.data
    assert isinstance(attack, A3FL) and attack.options == A3FLOptions(samples=64, trigger_epochs=3)
    return fed


def test_prepare_round_changes_the_trigger_and_lowers_the_target_loss() -> None:
    fed = federation()
    attack = fed.attack.data
    assert isinstance(attack, A3FL) and attack.context is not None
    x, _ = attack.sample(0, fed.data.malicious)
    model = attack.context.model
    fed.layout.load(model, fed.initial_state)
    model.eval()
    before_trigger = attack.trigger.clone()
    with torch.no_grad():
        before = float(attack.backdoor_loss(model, x, before_trigger))
    old_test = fed.data.backdoor_x
    fed.prepare_round(0, fed.initial_state, range(SMALL["num_clients"]))
    fed.layout.load(model, fed.initial_state)
    model.eval()
    with torch.no_grad():
        after = float(attack.backdoor_loss(model, x, attack.trigger))
    assert not torch.equal(attack.trigger, before_trigger)
    assert after < before
    low, high = attack.bounds()
    assert bool((attack.trigger >= low).all() and (attack.trigger <= high).all())
    # the federation re-poisoned the attackers and rebuilt the test set with the new trigger
    assert fed.data.backdoor_x is not old_test
    torch.testing.assert_close(fed.data.backdoor_x[:, 0, 0, :3], attack.trigger[0, 0, :3].expand(len(old_test), 3))
    value = attack.trigger[0, 0, 0]
    for k in fed.data.malicious:
        poisoned = fed.data.clients[k].y == attack.settings.target
        assert bool((fed.data.clients[k].x[poisoned, 0, 0, 0] == value).any())


def test_no_prepare_outside_attack_rounds() -> None:
    fed = federation(attack_start=1, rounds=3)
    attack = fed.attack.data
    assert isinstance(attack, A3FL)
    before = attack.trigger.clone()
    fed.prepare_round(0, fed.initial_state, range(4))
    assert torch.equal(attack.trigger, before)


def test_poison_writes_the_optimised_values() -> None:
    attack = ATTACKS["a3fl"](AttackSettings(target=3, values=((0, 1.0), (2, 0.5))), None, ThreatModel())
    assert isinstance(attack, A3FL)
    attack.trigger = torch.arange(24, dtype=torch.float32).reshape(2, 2, 6)
    xb, yb = attack.poison(torch.zeros(2, 3, 4, 8), torch.tensor([0, 1]), torch.tensor([False, True]))
    assert torch.equal(xb[1, 0][[0, 2]][:, [0, 1, 2, 4, 5, 6]], attack.trigger[0])
    assert torch.equal(xb[1, 2][[0, 2]][:, [0, 1, 2, 4, 5, 6]], attack.trigger[1])
    assert float(xb[0].abs().sum()) == 0.0 and float(xb[1, 1].abs().sum()) == 0.0 and yb.tolist() == [0, 3]


def test_prepare_round_without_a_federation_is_refused() -> None:
    with pytest.raises(RuntimeError, match="a3fl"):
        A3FL().prepare_round(0, torch.zeros(3), [1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trigger_epochs": 0}, "a3fl_trigger_epochs: got 0"),
        ({"adv_epochs": -1}, "a3fl_adv_epochs: got -1"),
        ({"samples": 0}, "a3fl_samples"),
        ({"trigger_lr": 0.0}, "a3fl_trigger_lr: got 0.0"),
        ({"adv_lambda": -0.1}, "a3fl_adv_lambda"),
    ],
)
def test_options_are_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        A3FLOptions(**kwargs)


@pytest.mark.parametrize("engine", ["batched", "sequential"])
def test_a_run_works_end_to_end_and_learns_its_trigger(engine: str) -> None:
    attacked = Simulation(make_experiment(**{**SMALL, "attack": "a3fl", "engine": engine, **FAST}))
    attack = attacked.federation.attack.data
    assert isinstance(attack, A3FL)
    records = [attacked.run_round(t) for t in range(attacked.cfg.rounds)]
    clean, _ = run("none", engine=engine)
    assert not torch.equal(attack.trigger, torch.ones(1, 2, 6))
    assert len(records) == 2 and all(r["accuracy"] >= 0 for r in records)
    assert asr_on(attacked, attacked) > asr_on(clean, attacked) + 20.0
