"""Coordinate-wise trimmed mean (spec §6.11): both tm_modes by hand, n > 2k, bounds, robustness, order invariance."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc import make_experiment
from spmc.config import build_as
from spmc.defenses.trimmed_mean import TrimmedMean, TrimmedMeanOptions, closest_to_median_mean, trimmed_mean

from ._helpers import BN, LINEAR, make_inputs

MODES = ("trim_extremes", "closest_to_median")


# Column 0: 0, 1, 2, 3, 100, 101 (median 2.5). Column 1: -7, 4, 5, 6, 7, 50. Column 2: constant.
HAND = torch.tensor(
    [[101.0, 5.0, 1.0], [0.0, -7.0, 1.0], [3.0, 50.0, 1.0], [100.0, 4.0, 1.0], [1.0, 7.0, 1.0], [2.0, 6.0, 1.0]]
)


def test_trim_extremes_hand_computed() -> None:
    agg = TrimmedMean(TrimmedMeanOptions(k=1)).aggregate(make_inputs(HAND))
    # k = 1: drop the smallest and largest per column, average the middle four.
    assert agg.global_state.tolist() == pytest.approx([(1 + 2 + 3 + 100) / 4, (4 + 5 + 6 + 7) / 4, 1.0])
    agg = TrimmedMean(TrimmedMeanOptions(k=2)).aggregate(make_inputs(HAND))
    assert agg.global_state.tolist() == pytest.approx([2.5, 5.5, 1.0])
    assert agg.weights is None and agg.accepted == tuple(range(6))


def test_closest_to_median_hand_computed() -> None:
    agg = TrimmedMean(TrimmedMeanOptions(k=1, mode="closest_to_median")).aggregate(make_inputs(HAND))
    # Column 0: median 2.5, the 4 nearest are 0, 1, 2, 3. Column 1: median 5.5, the 4 nearest 4, 5, 6, 7.
    assert agg.global_state.tolist() == pytest.approx([1.5, 5.5, 1.0])


def test_closest_to_median_tie_goes_to_the_smaller_value_in_any_order() -> None:
    for column in ([1.0, 3.0], [3.0, 1.0]):
        assert closest_to_median_mean(torch.tensor(column)[:, None], keep=1).tolist() == [1.0]


def test_k_zero_is_the_plain_mean() -> None:
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(trimmed_mean(x, 0), x.mean(dim=0), atol=1e-6)
    assert torch.allclose(closest_to_median_mean(x, 5), x.mean(dim=0), atol=1e-6)


def test_integer_counter_takes_the_plain_mean() -> None:
    states = torch.zeros(3, BN.dim)
    states[:, 0] = torch.tensor([1.0, 2.0, 9.0])
    states[:, -1] = torch.tensor([10.0, 20.0, 90.0])
    g = TrimmedMean(TrimmedMeanOptions(k=1)).aggregate(make_inputs(states, layout=BN)).global_state
    assert g[0].item() == 2.0 and g[-1].item() == 40.0
    assert (
        TrimmedMean(TrimmedMeanOptions(k=1, exclude_int_buffers=False))
        .aggregate(make_inputs(states, layout=BN))
        .global_state[-1]
        == 20
    )


def test_errors_and_config() -> None:
    with pytest.raises(ValueError, match=r"trimmed_mean_k.*k = 2.*n = 4"):
        TrimmedMean(TrimmedMeanOptions(k=2)).aggregate(make_inputs(HAND[:4]))
    with pytest.raises(ValueError, match=r"trimmed_mean_k.*k = 2.*n = 4"):
        TrimmedMean(TrimmedMeanOptions(k=2, mode="closest_to_median")).aggregate(make_inputs(HAND[:4]))
    with pytest.raises(ValueError, match="trimmed_mean_k"):
        TrimmedMean(TrimmedMeanOptions(k=-1))
    with pytest.raises(ValueError, match="tm_mode.*allowed"):
        TrimmedMean(TrimmedMeanOptions(k=1, mode="winsorize"))  # type: ignore[arg-type]
    d = build_as("trimmed_mean", make_experiment(gamma=0.3, num_clients=10, tm_mode="closest_to_median"))
    assert (d.k, d.options.mode) == (3, "closest_to_median")
    assert build_as("trimmed_mean", make_experiment(trimmed_mean_k=4)).k == 4


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(0, 4), seed=st.integers(0, 10_000), mode=st.sampled_from(MODES))
def test_within_coordinate_bounds_and_order_free(n: int, k: int, seed: int, mode: str) -> None:
    k = min(k, (n - 1) // 2)
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(n, BN.dim, generator=gen)
    ids = tuple(int(i) for i in torch.randperm(40, generator=gen)[:n])
    perm = torch.randperm(n, generator=gen)
    tm = TrimmedMean(TrimmedMeanOptions(k=k, mode=mode))  # type: ignore[arg-type]
    a = tm.aggregate(make_inputs(states, ids, layout=BN)).global_state
    b = tm.aggregate(make_inputs(states[perm], tuple(ids[i] for i in perm), layout=BN)).global_state
    assert bool((a >= states.min(dim=0).values).all()) and bool((a <= states.max(dim=0).values).all())
    assert torch.equal(a[:-1], b[:-1])  # sorting makes the float entries exactly order-free
    assert torch.allclose(a, b, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 9), k=st.integers(1, 4), seed=st.integers(0, 10_000), bad=st.integers(0, 8))
def test_trim_extremes_unaffected_by_a_1e6_scaled_update(n: int, k: int, seed: int, bad: int) -> None:
    k = min(k, (n - 1) // 2)
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(LINEAR.dim, generator=gen)
    updates = torch.randn(n, LINEAR.dim, generator=gen)
    bad = bad % n
    updates[bad] *= 1e6
    out = TrimmedMean(TrimmedMeanOptions(k=k)).aggregate(make_inputs(g + updates, global_state=g)).global_state
    s = (torch.cat([updates[:bad], updates[bad + 1 :]]) + g).sort(dim=0).values  # the other n − 1 values
    # Wherever the outlier ranks, the kept n − 2k values lie among s[k − 1 : n − k] (one rank of slack).
    lo = s[k - 1 : n - 1 - k].to(torch.float64).mean(dim=0)
    hi = s[k : n - k].to(torch.float64).mean(dim=0)
    assert bool((out >= lo - 1e-5).all()) and bool((out <= hi + 1e-5).all())
