"""FLAME (ATTACKS.md §A6): majority cluster kept, clipping to the median norm, seeded noise, robust helpers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from spmc.defenses.flame import (
    Flame,
    FlameOptions,
    cosine_distances,
    largest_cluster,
    log_norms,
    median_clip_factors,
)
from spmc.params import ParamLayout
from spmc.threat import ThreatModel

from ._helpers import BN, make_inputs

# five updates along +x (small y/z wobble), two outliers along +z and −y; LINEAR layout (3 parameters)
BENIGN = torch.tensor([[1, 0.1, 0], [2, 0, 0.1], [4, 0.2, 0], [3, -0.1, 0], [1.5, 0.1, 0]], dtype=torch.float64)
OUTLIERS = torch.tensor([[0, 0, 10], [0, -8, 0]], dtype=torch.float64)


def test_flame_rejects_outliers_and_clips_to_the_median_norm() -> None:
    g = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    updates = torch.cat([BENIGN, OUTLIERS])
    ids = (3, 4, 5, 6, 7, 20, 21)
    agg = Flame(FlameOptions(lam=0.0)).aggregate(make_inputs(g + updates, ids, global_state=g))
    assert agg.accepted == (3, 4, 5, 6, 7)
    assert agg.diagnostics["removed"] == [20, 21]
    norms = updates.norm(dim=1)
    s = float(norms.sort().values[3])  # n = 7: the 4th norm, that of (3, −0.1, 0)
    assert s == pytest.approx(math.sqrt(9.01))
    assert agg.diagnostics["median_norm"] == pytest.approx(s)
    clipped = BENIGN.clone()
    clipped[2] *= s / float(norms[2])  # only (4, 0.2, 0) is longer than S
    assert torch.allclose(agg.global_state, g + clipped.mean(dim=0), atol=1e-12)
    assert agg.weights is not None and agg.weights.tolist() == pytest.approx([0.2] * 5 + [0.0, 0.0])


def test_flame_noise_has_std_lambda_s_on_parameters_only_and_is_seeded() -> None:
    layout = ParamLayout.from_module(nn.Sequential(nn.Linear(50, 100), nn.BatchNorm1d(100)))
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(layout.dim, generator=gen, dtype=torch.float64)
    u = torch.randn(layout.dim, generator=gen, dtype=torch.float64)
    u[layout.int_mask()] = 1.0
    states = (g + u).repeat(6, 1)  # identical updates: one cluster, no clipping, mean = u
    inputs = make_inputs(states, layout=layout, global_state=g, round_index=4)
    flame = Flame(FlameOptions(lam=0.01), ThreatModel(seed=3))
    agg = flame.aggregate(inputs)
    s = float(u[layout.stat_mask()].norm())
    noise = agg.global_state - g - u
    params = layout.param_mask()
    assert float(noise[~params].abs().max()) < 1e-12  # BN statistics and the counter get no noise
    assert float(noise[params].std()) == pytest.approx(0.01 * s, rel=0.05)
    assert abs(float(noise[params].mean())) < 0.01 * s * 5 / math.sqrt(int(params.sum()))
    assert torch.equal(flame.aggregate(inputs).global_state, agg.global_state)
    other_round = make_inputs(states, layout=layout, global_state=g, round_index=5)
    assert not torch.equal(flame.aggregate(other_round).global_state, agg.global_state)
    other_seed = Flame(FlameOptions(lam=0.01), ThreatModel(seed=4)).aggregate(inputs).global_state
    assert not torch.equal(other_seed, agg.global_state)


def test_flame_keeps_a_single_client_and_all_on_all_noise() -> None:
    agg = Flame().aggregate(make_inputs(torch.tensor([[1.0, 2.0, 3.0]])))
    assert agg.accepted == (0,)
    assert largest_cluster([-1, -1, -1], (5, 6, 7)) == [0, 1, 2]
    assert largest_cluster([1, 0, 0, 1, -1], (9, 8, 7, 1, 2)) == [0, 3]  # a size tie goes to the smaller id


def test_flame_options_are_checked() -> None:
    for bad in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="flame_lambda"):
            FlameOptions(lam=bad)


def test_helpers_do_not_overflow_on_huge_rows() -> None:
    x = torch.tensor([[1e300, 1e300, 0.0], [-1e300, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 0.0]], dtype=torch.float64)
    d = cosine_distances(x)
    assert bool(torch.isfinite(d).all())
    assert d[0, 3] == pytest.approx(0.0, abs=1e-12) and d[0, 1] == pytest.approx(1 + 1 / math.sqrt(2))
    assert d[2, 0] == 1.0  # a zero row has cosine 0 with everything
    logs = log_norms(x)
    assert logs[0] == pytest.approx(math.log(1e300) + 0.5 * math.log(2)) and logs[2] == -math.inf
    factors, log_s = median_clip_factors(logs)
    # median of the norms {√2e300, 1e300, 0, 2√2}: (1e300 + 2√2)/2 ≈ 5e299
    assert log_s == pytest.approx(math.log(5e299))
    assert factors[0] == pytest.approx(5e299 / (math.sqrt(2) * 1e300)) and factors[2] == 1.0 and factors[3] == 1.0


def test_flame_integer_counters_are_left_out_and_averaged() -> None:
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(BN.dim, generator=gen)
    states = g + 0.1 * torch.randn(5, BN.dim, generator=gen)
    states[:, -1] = g[-1] + torch.tensor([3.0, 3.0, 3.0, 3.0, 1e6])  # a huge counter step only
    agg = Flame(FlameOptions(lam=0.0)).aggregate(make_inputs(states, layout=BN, global_state=g))
    assert agg.diagnostics["median_norm"] < 10  # the counter does not enter the norms
    assert agg.accepted is not None
    assert float(agg.global_state[-1]) == pytest.approx(float(states[list(agg.accepted), -1].mean()))
