"""Krum (spec §6.11): shared squared distances, hand-computed choice, size check, robustness, order invariance."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc import make_experiment
from spmc.config import build_as
from spmc.defenses.krum import Krum, KrumOptions, krum_scores, nearest_sums, pairwise_sq_distances

from ._helpers import BN, LINEAR, make_inputs

# a = (0,0), b = (1,0), c = (0,1), d = (5,5), e = (10,0); third coordinate 0.
HAND = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [5, 5, 0], [10, 0, 0]], dtype=torch.float32)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 8), d=st.integers(1, 30), seed=st.integers(0, 10_000), offset=st.floats(-100, 100))
def test_pairwise_sq_distances_equal_naive(n: int, d: int, seed: int, offset: float) -> None:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + offset
    naive = torch.tensor([[float(((x[i] - x[j]) ** 2).sum()) for j in range(n)] for i in range(n)])
    dist = pairwise_sq_distances(x.float())
    assert dist.dtype == torch.float64
    assert torch.allclose(dist, naive.to(torch.float64), rtol=1e-5, atol=1e-3 * (1 + offset**2))
    assert torch.equal(dist, dist.T) and bool((dist.diagonal() == 0).all()) and bool((dist >= 0).all())


def test_krum_scores_hand_computed() -> None:
    # n = 5, f = 1: sum of the n − f − 2 = 2 smallest squared distances.
    # D: ab 1, ac 1, ad 50, ae 100, bc 2, bd 41, be 81, cd 41, ce 101, de 50.
    scores = krum_scores(pairwise_sq_distances(HAND), f=1)
    assert scores.tolist() == pytest.approx([2.0, 3.0, 3.0, 82.0, 131.0])
    # f = 0: the 3 smallest.
    assert krum_scores(pairwise_sq_distances(HAND), f=0).tolist() == pytest.approx([52.0, 44.0, 44.0, 132.0, 231.0])


def test_krum_selects_lowest_score_and_returns_its_state() -> None:
    g = torch.tensor([1.0, -2.0, 0.5])
    ids = (10, 11, 12, 13, 14)
    agg = Krum(KrumOptions(f=1)).aggregate(make_inputs(HAND + g, ids, global_state=g))
    assert torch.equal(agg.global_state, HAND[0] + g)
    assert agg.accepted == (10,)
    assert agg.weights is not None and agg.weights.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert agg.diagnostics["removed"] == [11, 12, 13, 14]
    assert agg.diagnostics["scores"]["14"] == pytest.approx(131.0)


def test_krum_ties_go_to_the_smaller_id_in_any_order() -> None:
    states = torch.tensor([[0.0, 0, 0], [0, 0, 0], [3, 0, 0], [0, 3, 0], [9, 9, 0]])
    for ids in [(5, 2, 7, 8, 9), (2, 5, 7, 8, 9)]:
        assert Krum(KrumOptions(f=1)).aggregate(make_inputs(states, ids)).accepted == (2,)


def test_krum_size_and_option_errors() -> None:
    with pytest.raises(ValueError, match=r"n = 4, f = 1"):
        Krum(KrumOptions(f=1)).aggregate(make_inputs(HAND[:4]))
    with pytest.raises(ValueError, match="krum_f"):
        Krum(KrumOptions(f=-1))
    Krum(KrumOptions(f=0)).aggregate(make_inputs(HAND[:3]))  # n > 2 suffices for f = 0


def test_krum_f_from_config() -> None:
    assert build_as("krum", make_experiment(gamma=0.3, num_clients=10)).f == 3
    assert build_as("krum", make_experiment(gamma=0.3, num_clients=10, krum_f=1)).f == 1
    assert build_as("krum", make_experiment(attack="none")).f == 0


def test_krum_distances_leave_integer_counters_out() -> None:
    g = torch.randn(BN.dim, generator=torch.Generator().manual_seed(0))
    states = g + 0.01 * torch.randn(5, BN.dim, generator=torch.Generator().manual_seed(1))
    states[:, -1] = g[-1] + torch.tensor([10.0, 500.0, 10.0, 10.0, 10.0])  # client 1: a huge counter step
    inputs = make_inputs(states, layout=BN, global_state=g)
    scores_in = Krum(KrumOptions(f=1, exclude_int_buffers=False)).aggregate(inputs).diagnostics["scores"]
    scores_out = Krum(KrumOptions(f=1)).aggregate(inputs).diagnostics["scores"]
    assert scores_in["1"] > 1e4 > scores_out["1"]
    float_only = krum_scores(pairwise_sq_distances((states - g)[:, :-1]), f=1)
    assert [scores_out[str(i)] for i in range(5)] == pytest.approx(float_only.tolist())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(5, 9), f=st.integers(1, 3), seed=st.integers(0, 10_000), bad=st.integers(0, 8))
def test_krum_never_selects_a_1e6_scaled_update(n: int, f: int, seed: int, bad: int) -> None:
    f = min(f, (n - 3) // 2)
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(LINEAR.dim, generator=gen)
    updates = torch.randn(n, LINEAR.dim, generator=gen)
    bad = bad % n
    updates[bad] *= 1e6
    agg = Krum(KrumOptions(f=f)).aggregate(make_inputs(g + updates, global_state=g))
    # As if the outlier were infinitely far: every other client's n − f − 2 nearest lie among the n − 2 others.
    others = [i for i in range(n) if i != bad]
    expected = others[int(nearest_sums(pairwise_sq_distances(updates[others]), n - f - 2).argmin())]
    assert agg.accepted == (expected,)
    assert torch.equal(agg.global_state, g + updates[expected])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 8), seed=st.integers(0, 10_000))
def test_krum_ignores_client_order(n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(n, BN.dim, generator=gen)
    ids = tuple(int(i) for i in torch.randperm(50, generator=gen)[:n])
    perm = torch.randperm(n, generator=gen)
    f = (n - 3) // 2
    a = Krum(KrumOptions(f=f)).aggregate(make_inputs(states, ids, layout=BN))
    b = Krum(KrumOptions(f=f)).aggregate(make_inputs(states[perm], tuple(ids[i] for i in perm), layout=BN))
    assert torch.equal(a.global_state, b.global_state)
    assert a.accepted == b.accepted
    assert a.weights is not None and b.weights is not None
    assert torch.equal(a.weights[perm], b.weights)
    assert a.weights.sum().item() == 1.0 and bool((a.weights >= 0).all())


def test_lowest_scores_treats_rounding_level_differences_as_ties() -> None:
    from spmc.defenses.krum import lowest_scores

    scores = torch.tensor([1.0, 1.0 + 1e-15, 3.0], dtype=torch.float64)
    assert lowest_scores(scores, (7, 4, 1), 1) == [1]  # client 4 wins the (rounding-level) tie with client 7
    assert lowest_scores(scores, (4, 7, 1), 1) == [0]
    assert lowest_scores(torch.tensor([2.0, 1.0, 1.5]), (0, 1, 2), 2) == [1, 2]
