"""Coordinate-wise median (spec §6.11): odd and even n, integer counters, bounds, robustness, order invariance."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc import make_experiment
from spmc.config import build_as
from spmc.defenses.median import Median, MedianOptions, coordinate_median

from ._helpers import BN, LINEAR, make_inputs


def test_median_hand_computed_odd_and_even() -> None:
    odd = torch.tensor([[3.0, -1.0, 7.0], [1.0, 5.0, 7.0], [2.0, 0.0, -100.0]])
    assert Median().aggregate(make_inputs(odd)).global_state.tolist() == [2.0, 0.0, 7.0]
    even = torch.tensor([[3.0, -1.0, 7.0], [1.0, 5.0, 8.0], [2.0, 0.0, -100.0], [10.0, 1.0, 9.0]])
    agg = Median().aggregate(make_inputs(even))
    assert agg.global_state.tolist() == [2.5, 0.5, 7.5]  # mean of the two middle values
    assert torch.median(even, dim=0).values.tolist() == [2.0, 0.0, 7.0]  # not torch's lower median
    assert agg.weights is None and agg.accepted == (0, 1, 2, 3)


def test_coordinate_median_even_in_float64() -> None:
    x = torch.tensor([[3.0e38], [3.2e38]])  # their float32 sum overflows
    assert coordinate_median(x).tolist() == [pytest.approx(3.1e38, rel=1e-6)]
    with pytest.raises(ValueError, match="n >= 1"):
        coordinate_median(torch.zeros(0, 3))


def test_median_integer_counter_takes_the_plain_mean() -> None:
    states = torch.zeros(3, BN.dim)
    states[:, 0] = torch.tensor([1.0, 2.0, 9.0])
    states[:, -1] = torch.tensor([10.0, 20.0, 90.0])
    g = Median().aggregate(make_inputs(states, layout=BN)).global_state
    assert g[0].item() == 2.0 and g[-1].item() == 40.0
    g_repo = Median(MedianOptions(exclude_int_buffers=False)).aggregate(make_inputs(states, layout=BN)).global_state
    assert g_repo[-1].item() == 20.0
    assert build_as("median", make_experiment(profile="repo")).options.exclude_int_buffers is False


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3))
def test_median_within_coordinate_bounds_and_order_free(n: int, seed: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    states = scale * torch.randn(n, BN.dim, generator=gen)
    ids = tuple(int(i) for i in torch.randperm(40, generator=gen)[:n])
    perm = torch.randperm(n, generator=gen)
    a = Median().aggregate(make_inputs(states, ids, layout=BN)).global_state
    b = Median().aggregate(make_inputs(states[perm], tuple(ids[i] for i in perm), layout=BN)).global_state
    assert bool((a >= states.min(dim=0).values).all()) and bool((a <= states.max(dim=0).values).all())
    assert torch.allclose(a, b, rtol=0, atol=1e-6 * scale)
    assert torch.equal(a[:-1], b[:-1])  # sorting makes the float entries exactly order-free


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 9), seed=st.integers(0, 10_000), bad=st.integers(0, 8))
def test_median_unaffected_by_a_1e6_scaled_update(n: int, seed: int, bad: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(LINEAR.dim, generator=gen)
    updates = torch.randn(n, LINEAR.dim, generator=gen)
    bad = bad % n
    updates[bad] *= 1e6
    out = Median().aggregate(make_inputs(g + updates, global_state=g)).global_state
    others = torch.cat([updates[:bad], updates[bad + 1 :]]) + g
    # one arbitrary value moves the median by at most one rank among the other n − 1 sorted values s
    assert bool((out >= others.min(dim=0).values).all()) and bool((out <= others.max(dim=0).values).all())
    s = others.sort(dim=0).values
    lo, hi = s[(n - 1) // 2 - 1], s[n // 2]
    assert bool((out >= lo - 1e-6).all()) and bool((out <= hi + 1e-6).all())
