"""Bulyan (spec §6.4 [REC]): recursive Krum selection and the coordinate step by hand, n ≥ 4f + 3, a naive
reference, integer counters, order invariance."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc import make_experiment
from spmc.config import build_as
from spmc.defenses.bulyan import Bulyan, BulyanOptions, bulyan_coordinate_step, bulyan_select
from spmc.defenses.krum import pairwise_sq_distances

from ._helpers import BN, LINEAR, make_inputs

X = [0.0, 1.0, 2.0, 3.0, 4.0, 100.0, -60.0]  # updates on coordinate 0 of clients 0..6


def naive_bulyan(updates: list[list[float]], f: int) -> list[float]:
    """Recursive Krum and the β-nearest-to-median mean written out with Python lists (spec §6.4)."""
    n = len(updates)
    dist = [[sum((a - b) ** 2 for a, b in zip(u, v)) for v in updates] for u in updates]
    remaining, chosen = list(range(n)), []
    while len(chosen) < n - 2 * f:
        r = len(remaining)
        count = max(r - f - 2, 1)
        scores = {i: sum(sorted(dist[i][j] for j in remaining if j != i)[:count]) for i in remaining}
        best = min(remaining, key=lambda i: (scores[i], i))
        chosen.append(best)
        remaining.remove(best)
    beta = len(chosen) - 2 * f
    out = []
    for j in range(len(updates[0])):
        vals = sorted(updates[i][j] for i in chosen)
        h = len(vals)
        med = vals[h // 2] if h % 2 else (vals[h // 2 - 1] + vals[h // 2]) / 2
        nearest = sorted(vals, key=lambda v: abs(v - med))[:beta]
        out.append(sum(nearest) / beta)
    return out


def test_selection_hand_computed() -> None:
    # f = 1, n = 7: step 1 (4 nearest): x=2 scores 4+1+1+4 = 10. Step 2 (3 nearest): x=1 and x=3 tie at 14 → id 1.
    # Step 3 (2 nearest among 0, 3, 4, 100, -60): x=3 scores 1 + 9 = 10. Step 4 (1 nearest): x=0 and x=4 tie at 16 →
    # id 0. Step 5 (R = 3, max(0, 1) = 1 nearest): x=4 and x=-60 tie at 64² → id 4.
    dist = pairwise_sq_distances(torch.tensor(X)[:, None])
    assert bulyan_select(dist, 1, tuple(range(7))) == [2, 1, 3, 0, 4]


def test_coordinate_step_hand_computed() -> None:
    # θ = 5, f = 1 → β = 3 values nearest the median of each column.
    cols = torch.tensor([[0.0, 0.0], [1.0, 0.5], [2.0, 5.0], [3.0, 6.0], [50.0, 7.0]])
    # column 0: median 2 → {1, 2, 3} → 2; column 1: median 5 → {5, 6, 7} → 6 (the trimmed mean would give 3.83)
    assert bulyan_coordinate_step(cols, 1).tolist() == pytest.approx([2.0, 6.0])


def test_bulyan_is_applied_as_an_update() -> None:
    g = torch.tensor([10.0, -1.0, 0.5])
    updates = torch.zeros(7, 3)
    updates[:, 0] = torch.tensor(X)
    updates[:, 1] = 2 * updates[:, 0] + 1  # every squared distance × 5: the same selection, ties included
    agg = Bulyan(BulyanOptions(f=1)).aggregate(make_inputs(g + updates, global_state=g))
    # selected clients 0-4; coordinate 0: {0..4}, median 2 → mean(1, 2, 3) = 2.
    # coordinate 1: {1, 3, 5, 7, 9}, median 5 → mean(3, 5, 7) = 5.
    assert agg.global_state.tolist() == pytest.approx([12.0, 4.0, 0.5])
    assert agg.accepted == (0, 1, 2, 3, 4)
    assert agg.diagnostics["removed"] == [5, 6]
    assert agg.diagnostics["selection_order"] == [2, 1, 3, 0, 4]


def test_bulyan_refuses_too_few_clients() -> None:
    states = torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"bulyan_f.*4f \+ 3.*n = 6, f = 1"):
        Bulyan(BulyanOptions(f=1)).aggregate(make_inputs(states))
    with pytest.raises(ValueError, match=r"n = 10, f = 2"):
        Bulyan(BulyanOptions(f=2)).aggregate(make_inputs(torch.randn(10, 3)))
    Bulyan(BulyanOptions(f=2)).aggregate(make_inputs(torch.randn(11, 3)))
    with pytest.raises(ValueError, match="bulyan_f"):
        Bulyan(BulyanOptions(f=-1))
    assert build_as("bulyan", make_experiment(bulyan_f=2)).options.f == 2


def test_integer_counter_takes_the_selected_clients_plain_mean() -> None:
    g = torch.zeros(BN.dim)
    updates = torch.zeros(7, BN.dim)
    updates[:, 0] = torch.tensor(X)
    updates[:, -1] = torch.tensor([10.0, 10.0, 10.0, 10.0, 40.0, 1000.0, 1000.0])
    agg = Bulyan(BulyanOptions(f=1)).aggregate(make_inputs(g + updates, global_state=g, layout=BN))
    assert agg.accepted == (0, 1, 2, 3, 4)  # the counters of 5 and 6 do not enter the distances
    assert agg.global_state[-1].item() == pytest.approx(16.0)  # plain mean over the selected 5


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 12), f=st.integers(0, 2), seed=st.integers(0, 10_000))
def test_bulyan_equals_naive_reference(n: int, f: int, seed: int) -> None:
    f = min(f, (n - 3) // 4)
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(LINEAR.dim, generator=gen, dtype=torch.float64).float()
    updates = torch.randn(n, LINEAR.dim, generator=gen)
    updates[0] *= 1e6  # an outlier, never selected when f ≥ 1
    states = g + updates
    agg = Bulyan(BulyanOptions(f=f)).aggregate(make_inputs(states, global_state=g))
    expected = naive_bulyan((states - g).tolist(), f)
    assert agg.global_state.tolist() == pytest.approx([a + b for a, b in zip(g.tolist(), expected)], rel=1e-6, abs=1e-4)
    if f >= 1:
        assert 0 not in agg.accepted


@settings(max_examples=30, deadline=None)
@given(n=st.integers(7, 11), seed=st.integers(0, 10_000))
def test_bulyan_ignores_client_order_and_stays_within_bounds(n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(BN.dim, generator=gen)
    states = g + torch.randn(n, BN.dim, generator=gen)
    ids = tuple(int(i) for i in torch.randperm(40, generator=gen)[:n])
    perm = torch.randperm(n, generator=gen)
    a = Bulyan(BulyanOptions(f=1)).aggregate(make_inputs(states, ids, global_state=g, layout=BN))
    b = Bulyan(BulyanOptions(f=1)).aggregate(
        make_inputs(states[perm], tuple(ids[i] for i in perm), global_state=g, layout=BN)
    )
    assert torch.allclose(a.global_state, b.global_state, atol=1e-6)
    assert set(a.accepted or ()) == set(b.accepted or ())
    assert bool((a.global_state >= states.min(dim=0).values - 1e-6).all())
    assert bool((a.global_state <= states.max(dim=0).values + 1e-6).all())
