"""Multi-Krum (spec §6.11): mean of the m' lowest Krum scores; size checks, robustness, order invariance."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc import make_experiment
from spmc.config import build_as
from spmc.defenses.krum import nearest_sums, pairwise_sq_distances
from spmc.defenses.multikrum import MultiKrum, MultiKrumOptions

from ._helpers import BN, make_inputs

# Krum scores with f = 1 (see test_krum.py): a 2, b 3, c 3, d 82, e 131.
HAND = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [5, 5, 0], [10, 0, 0]], dtype=torch.float32)


def test_multikrum_hand_computed_default_select_is_n_minus_f() -> None:
    g = torch.tensor([0.5, 0.5, -1.0])
    agg = MultiKrum(MultiKrumOptions(f=1)).aggregate(make_inputs(HAND + g, (3, 4, 5, 6, 7), global_state=g))
    assert agg.global_state.tolist() == pytest.approx([1.5 + 0.5, 1.5 + 0.5, -1.0])  # mean of a, b, c, d
    assert agg.accepted == (3, 4, 5, 6)
    assert agg.diagnostics["removed"] == [7]
    assert agg.weights is not None and agg.weights.tolist() == [0.25, 0.25, 0.25, 0.25, 0.0]


def test_multikrum_select_option() -> None:
    agg = MultiKrum(MultiKrumOptions(f=1, select=3)).aggregate(make_inputs(HAND))
    assert agg.global_state.tolist() == pytest.approx([1 / 3, 1 / 3, 0.0])
    assert agg.accepted == (0, 1, 2)
    agg = MultiKrum(MultiKrumOptions(f=1, select=1)).aggregate(make_inputs(HAND))
    assert torch.equal(agg.global_state, HAND[0])


def test_multikrum_errors() -> None:
    with pytest.raises(ValueError, match=r"n = 4, f = 1"):
        MultiKrum(MultiKrumOptions(f=1)).aggregate(make_inputs(HAND[:4]))
    with pytest.raises(ValueError, match=r"multikrum_select: got 6"):
        MultiKrum(MultiKrumOptions(f=1, select=6)).aggregate(make_inputs(HAND))
    with pytest.raises(ValueError, match="multikrum_select"):
        MultiKrum(MultiKrumOptions(f=1, select=0))
    with pytest.raises(ValueError, match="krum_f"):
        MultiKrum(MultiKrumOptions(f=-2))


def test_multikrum_from_config() -> None:
    d = build_as("multikrum", make_experiment(gamma=0.2, num_clients=10))
    assert (d.f, d.options.select) == (2, None)
    d = build_as("multikrum", make_experiment(krum_f=1, multikrum_select=5))
    assert (d.f, d.options.select) == (1, 5)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(5, 9), f=st.integers(1, 3), seed=st.integers(0, 10_000), bad=st.integers(0, 8))
def test_multikrum_never_selects_a_1e6_scaled_update(n: int, f: int, seed: int, bad: int) -> None:
    f = min(f, (n - 3) // 2)
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(BN.dim, generator=gen)
    updates = torch.randn(n, BN.dim, generator=gen)
    bad = bad % n
    updates[bad] *= 1e6
    agg = MultiKrum(MultiKrumOptions(f=f)).aggregate(make_inputs(g + updates, global_state=g, layout=BN))
    assert bad not in agg.accepted and len(agg.accepted) == n - f
    others = [i for i in range(n) if i != bad]
    scores = nearest_sums(pairwise_sq_distances(updates[others][:, :-1]), n - f - 2)
    expected = sorted(others[int(i)] for i in scores.argsort()[: n - f])
    assert list(agg.accepted) == expected
    assert torch.allclose(agg.global_state, g + updates[expected].mean(dim=0), atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 8), seed=st.integers(0, 10_000))
def test_multikrum_ignores_client_order(n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(n, BN.dim, generator=gen)
    ids = tuple(int(i) for i in torch.randperm(50, generator=gen)[:n])
    perm = torch.randperm(n, generator=gen)
    f = (n - 3) // 2
    a = MultiKrum(MultiKrumOptions(f=f)).aggregate(make_inputs(states, ids, layout=BN))
    b = MultiKrum(MultiKrumOptions(f=f)).aggregate(make_inputs(states[perm], tuple(ids[i] for i in perm), layout=BN))
    assert torch.allclose(a.global_state, b.global_state, atol=1e-6)
    assert set(a.accepted) == set(b.accepted)
    assert a.weights is not None and b.weights is not None
    assert torch.equal(a.weights[perm], b.weights)
    assert a.weights.sum().item() == pytest.approx(1.0) and bool((a.weights >= 0).all())
