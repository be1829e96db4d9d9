"""``label_flip`` (ATTACKS.md §A3): every sample of an attacker gets y → C − 1 − y; untargeted."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from spmc.attacks import ATTACKS, AttackSettings
from spmc.attacks.label_flip import LabelFlip
from spmc.threat import ThreatModel

from ._helpers import run


def test_exact_relabelling() -> None:
    attack = ATTACKS["label_flip"](AttackSettings(num_classes=10), None, ThreatModel())
    y = torch.arange(10)
    mask = attack.poison_mask(y, 0.0, torch.Generator().manual_seed(0))
    assert bool(mask.all())  # every sample, whatever the poison rate
    x = torch.randn(10, 3, 2, 2)
    xb, yb = attack.poison(x.clone(), y, mask)
    assert yb.tolist() == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0] and torch.equal(xb, x)
    assert attack.poison(x, y, torch.arange(10) < 3)[1].tolist() == [9, 8, 7, 3, 4, 5, 6, 7, 8, 9]
    assert not LabelFlip.targeted


@given(st.integers(2, 100), st.data())
def test_flip_is_an_involution_within_the_classes(classes: int, data: st.DataObject) -> None:
    y = torch.tensor(data.draw(st.lists(st.integers(0, classes - 1), min_size=1, max_size=20)))
    attack = LabelFlip(AttackSettings(num_classes=classes))
    ones = torch.ones_like(y, dtype=torch.bool)
    _, once = attack.poison(torch.zeros(len(y), 1), y, ones)
    assert bool(((once >= 0) & (once < classes)).all())
    assert torch.equal(attack.poison(torch.zeros(len(y), 1), once, ones)[1], y)


def test_test_set_is_the_clean_test_set() -> None:
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 3])
    xb, yb, _ = LabelFlip().test_set(x, y)
    assert xb is x and yb is y


def test_a_run_trains_attackers_on_flipped_labels() -> None:
    attacked, records = run("label_flip")
    clean, clean_records = run("none")
    for k in attacked.data.malicious:
        assert torch.equal(attacked.data.clients[k].y, 9 - attacked.data.clean[k].y)
    assert not torch.equal(attacked.global_state, clean.global_state)
    assert records[-1]["accuracy"] != clean_records[-1]["accuracy"]
