"""The backdoor of spec §2: malicious ids, trigger entries, poisoning, backdoor test set."""

from __future__ import annotations

import pytest
import torch

from spmc.attacks import apply_trigger, backdoor_test_set, malicious_ids, poison_mask, trigger_values
from spmc.attacks.backdoor import poison_batch


def test_malicious_ids() -> None:
    assert malicious_ids(10, 0.2) == (8, 9)
    assert malicious_ids(10, 0.3) == (7, 8, 9)
    assert malicious_ids(10, 0.0) == ()
    assert malicious_ids(7, 0.3) == (5, 6)
    with pytest.raises(ValueError, match="gamma"):
        malicious_ids(10, 1.0)


def test_trigger_writes_exactly_its_12_entries() -> None:
    x = torch.full((2, 3, 32, 32), -5.0)
    apply_trigger(x, trigger_values("normalized", (0.1307,) * 3, (0.3081,) * 3))
    changed = (x != -5.0).nonzero().tolist()
    expected = [[b, 0, r, c] for b in range(2) for r in (0, 2) for c in (0, 1, 2, 4, 5, 6)]
    assert sorted(changed) == sorted(expected)
    assert bool((x[:, 0, 0, [0, 1, 2, 4, 5, 6]] == 1.0).all())


def test_trigger_pixel_space_value() -> None:
    v = trigger_values("pixel", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2615))
    assert v == {0: pytest.approx((1 - 0.4914) / 0.2470)}
    with pytest.raises(ValueError, match="trigger_space"):
        trigger_values("raw", (0.0,), (1.0,))


def test_poison_batch_only_touches_masked_rows() -> None:
    x = torch.zeros(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    mask = torch.tensor([True, False, True, False])
    xp, yp = poison_batch(x, y, mask, attack="base", values={0: 1.0}, target=2)
    assert yp.tolist() == [2, 1, 2, 3]
    assert int((xp[0] != 0).sum()) == 12 and int((xp[1] != 0).sum()) == 0


def test_poison_mask_rate_and_semantic_source() -> None:
    labels = torch.arange(10).repeat(2000)
    m = poison_mask(labels, 0.3, torch.Generator().manual_seed(0))
    assert 0.28 < m.float().mean() < 0.32
    s = poison_mask(labels, 0.5, torch.Generator().manual_seed(0), attack="semantic", source_label=3)
    assert set(labels[s].tolist()) == {3}


def test_backdoor_test_set_and_target_exclusion() -> None:
    x = torch.zeros(5, 3, 32, 32)
    y = torch.tensor([0, 2, 2, 7, 9])
    bx, by, not_target = backdoor_test_set(x, y, attack="base", values={0: 1.0}, target=2)
    assert by.tolist() == [2] * 5 and not_target.tolist() == [True, False, False, True, True]
    assert bool((bx[:, 0, 2, 6] == 1.0).all()) and torch.equal(x, torch.zeros_like(x))
