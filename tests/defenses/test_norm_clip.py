"""Norm clipping (Sun et al. 2019; ATTACKS.md §A6): hand-computed clipped mean, auto bound, counters, outliers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc import make_experiment
from spmc.config import build_defense
from spmc.defenses.norm_clip import (
    NormClip,
    NormClipOptions,
    clip_factors,
    median,
    power_of_two_scale,
    scaled_row_norms,
)

from ._helpers import BN, LINEAR, make_inputs

G = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
# norms 5, 1, 2: the median is 2
U = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0], [0.0, 2.0, 0.0]], dtype=torch.float64)


def test_auto_bound_is_the_median_norm_and_the_mean_is_uniform() -> None:
    agg = NormClip().aggregate(make_inputs(G + U, (7, 3, 5), global_state=G))
    # u_7 is clipped to 2 · (0.6, 0.8, 0) = (1.2, 1.6, 0); the others are short enough
    expected = G + torch.tensor([1.2 + 0 + 0, 1.6 + 0 + 2.0, 0 + 1.0 + 0]) / 3
    assert torch.allclose(agg.global_state, expected, atol=1e-12)
    assert agg.diagnostics["clip_norm"] == pytest.approx(2.0)
    assert agg.diagnostics["clipped"] == [7]
    assert agg.diagnostics["clip_factors"] == pytest.approx({"7": 0.4, "3": 1.0, "5": 1.0})
    assert agg.weights is not None and agg.weights.tolist() == pytest.approx([1 / 3] * 3)
    assert agg.accepted == (7, 3, 5)


def test_fixed_bound() -> None:
    agg = NormClip(NormClipOptions(clip_norm=1.0)).aggregate(make_inputs(G + U, global_state=G))
    expected = G + torch.tensor([0.6, 0.8 + 1.0, 1.0]) / 3  # (0.6, 0.8, 0), (0, 0, 1), (0, 1, 0)
    assert torch.allclose(agg.global_state, expected, atol=1e-12)
    assert agg.diagnostics["clipped"] == [0, 2]


def test_median_of_even_count_is_the_mean_of_the_middle_values() -> None:
    assert median(torch.tensor([4.0, 1.0, 3.0, 2.0])) == 2.5
    assert median(torch.tensor([5.0])) == 5.0
    with pytest.raises(ValueError):
        median(torch.tensor([]))


def test_clip_factors_and_scaled_norms_never_overflow() -> None:
    assert clip_factors(torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64), 2.0).tolist() == [1.0, 1.0, 0.5]
    assert clip_factors(torch.tensor([0.0, 1e300]), float("inf")).tolist() == [1.0, 1.0]
    big = torch.full((2, 4), 1e300, dtype=torch.float64)
    big[1] *= -0.5
    s = power_of_two_scale(big)
    norms = scaled_row_norms(big, s) * s
    assert torch.isfinite(norms).all()
    assert norms.tolist() == pytest.approx([2e300, 1e300])


def test_integer_counters_are_averaged_and_left_out_of_the_norms() -> None:
    g = torch.zeros(BN.dim)
    states = torch.zeros(3, BN.dim)
    states[:, 0] = torch.tensor([1.0, 2.0, 3.0])  # norms 1, 2, 3 over the float entries: median 2
    states[:, -1] = torch.tensor([10.0, 10.0, 1000.0])  # counters: client 2 claims many steps
    agg = NormClip().aggregate(make_inputs(states, layout=BN, global_state=g))
    assert agg.global_state[0].item() == pytest.approx((1 + 2 + 2) / 3)
    assert agg.global_state[-1].item() == pytest.approx(340.0)  # the plain mean of the counters
    with_counters = NormClip(NormClipOptions(exclude_int_buffers=False)).aggregate(
        make_inputs(states, layout=BN, global_state=g)
    )
    assert with_counters.diagnostics["clip_norm"] == pytest.approx(torch.tensor([2.0, 10.0]).norm().item())


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 9), seed=st.integers(0, 10_000), bad=st.integers(0, 8))
def test_an_outlier_moves_the_mean_by_at_most_m_over_n(n: int, seed: int, bad: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    updates = torch.randn(n, LINEAR.dim, generator=gen, dtype=torch.float64)
    bad = bad % n
    updates[bad] *= 1e6
    agg = NormClip().aggregate(make_inputs(updates))
    bound = agg.diagnostics["clip_norm"]
    others = [i for i in range(n) if i != bad]
    norms = updates[others].norm(dim=1)
    rest = (updates[others] * clip_factors(norms, bound).unsqueeze(1)).sum(0) / n
    assert float((agg.global_state - rest).norm()) == pytest.approx(bound / n, rel=1e-9)
    assert bound <= float(norms.max()) * (1 + 1e-12)  # the median ignores the outlier's size


def test_option_errors_name_the_key() -> None:
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="clip_norm"):
            NormClipOptions(clip_norm=bad)


def test_config_sets_the_bound() -> None:
    defense = build_defense(make_experiment(defense="norm_clip", clip_norm=0.5))
    assert isinstance(defense, NormClip) and defense.options.clip_norm == 0.5
