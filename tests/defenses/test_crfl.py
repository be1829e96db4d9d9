"""CRFL (spec §6.7, D23): weighted mean, parameter-norm clip with ρ_t = min(5t + 30, 100), noise except last round."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from spmc.config import build_as
from spmc.defenses.base import RoundInputs
from spmc.defenses.crfl import CRFL, CRFLOptions, clip_norm, clip_threshold
from spmc.params import ParamLayout
from spmc.threat import ThreatModel


def bn_layout() -> ParamLayout:
    return ParamLayout.from_module(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))


def inputs_for(
    layout: ParamLayout, g: torch.Tensor, states: torch.Tensor, ids: list[int], counts: list[float], t: int
) -> RoundInputs:
    return RoundInputs(g, states, tuple(ids), torch.tensor(counts, dtype=torch.float64), layout, t)


def test_clip_threshold_schedule() -> None:
    assert clip_threshold(0) == 30.0
    assert clip_threshold(10) == 80.0
    assert clip_threshold(14) == 100.0  # 5·14 + 30 = 100
    assert clip_threshold(49) == 100.0  # capped
    assert clip_threshold(3, slope=2.0, bias=10.0, cap=30.0) == 16.0


def test_clip_norm_hand_computed() -> None:
    v = torch.tensor([30.0, 40.0])  # norm 50
    clipped, norm = clip_norm(v, 10.0)
    assert norm == 50.0
    assert torch.allclose(clipped, v * (10.0 / (50.0 + 1e-6)))
    same, _ = clip_norm(v, 50.0)  # not above the threshold: unchanged
    assert torch.equal(same, v)


def test_mean_clip_and_no_noise_in_the_last_round() -> None:
    layout = bn_layout()
    params = layout.param_mask()
    g = torch.zeros(layout.dim)
    states = torch.zeros(2, layout.dim)
    states[0, params] = 40.0  # 10 params: the mean (25) has norm 25·√10 ≈ 79.1 > ρ_4 = 50 > ρ_0 = 30
    states[1, params] = 10.0
    states[:, ~params] = torch.tensor([[1.0] * 5, [3.0] * 5])
    counts = [2.0, 2.0]
    crfl = CRFL(CRFLOptions(rounds=5, sigma=0.5), ThreatModel(seed=3))
    last = crfl.aggregate(inputs_for(layout, g, states, [0, 1], counts, t=4))  # t = T − 1: no noise
    norm = 25.0 * math.sqrt(10)
    rho = 50.0  # 5·4 + 30
    assert torch.allclose(last.global_state[params], torch.full((10,), 25.0 * rho / (norm + 1e-6)), atol=1e-6)
    assert torch.equal(last.global_state[~params], torch.full((5,), 2.0))  # buffers: mean, never clipped
    assert last.diagnostics["clipped"] and not last.diagnostics["noise"]
    assert torch.allclose(last.global_state[params].double().norm(), torch.tensor(rho, dtype=torch.float64))

    first = crfl.aggregate(inputs_for(layout, g, states, [0, 1], counts, t=0))  # ρ_0 = 30, with noise
    noise = first.global_state[params] - torch.full((10,), 25.0 * 30.0 / (norm + 1e-6))
    assert first.diagnostics["noise"]
    assert 0.05 < float(noise.std()) < 2.0 and bool((noise != 0).all())
    assert torch.equal(first.global_state[~params], torch.full((5,), 2.0))  # noise only on the parameters
    again = crfl.aggregate(inputs_for(layout, g, states.flip(0), [1, 0], counts, t=0))
    assert torch.allclose(first.global_state, again.global_state, atol=1e-6)  # same seed and round: same noise
    other_round = crfl.aggregate(inputs_for(layout, g, states, [0, 1], counts, t=1))
    noise_1 = other_round.global_state[params] - torch.full((10,), 25.0 * 35.0 / (norm + 1e-6))
    assert 0.05 < float(noise_1.std()) < 2.0 and not torch.allclose(noise_1, noise, atol=1e-3)


def test_no_clip_below_threshold_and_scale() -> None:
    layout = ParamLayout.from_module(nn.Linear(2, 1))
    g = torch.tensor([1.0, 1.0, 1.0])
    states = torch.tensor([[2.0, 1.0, 0.0], [4.0, 1.0, 0.0]])
    counts = [1.0, 3.0]  # mean update (2.5, 0, −1)
    out = CRFL(CRFLOptions(rounds=2, sigma=0.0)).aggregate(inputs_for(layout, g, states, [0, 1], counts, t=0))
    assert torch.allclose(out.global_state, torch.tensor([3.5, 1.0, 0.0]))
    assert not out.diagnostics["clipped"]
    scaled = CRFL(CRFLOptions(rounds=2, sigma=0.0, scale=2.0)).aggregate(
        inputs_for(layout, g, states, [0, 1], counts, t=1)
    )
    assert torch.allclose(scaled.global_state, torch.tensor([6.0, 1.0, -1.0]))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), t=st.integers(0, 4))
def test_permutation_invariance_and_weights(seed: int, n: int, t: int) -> None:
    layout = bn_layout()
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(layout.dim, generator=gen) * 10
    states = g + torch.randn(n, layout.dim, generator=gen) * 10
    counts = torch.randint(1, 50, (n,), generator=gen).double().tolist()
    ids = list(range(n))
    crfl = CRFL(CRFLOptions(rounds=5), ThreatModel(seed=seed))
    out = crfl.aggregate(inputs_for(layout, g, states, ids, counts, t))
    perm = torch.randperm(n, generator=gen)
    out_p = crfl.aggregate(inputs_for(layout, g, states[perm], [ids[i] for i in perm], [counts[i] for i in perm], t))
    assert torch.allclose(out.global_state, out_p.global_state, atol=1e-5)
    assert out.weights is not None and bool((out.weights >= 0).all())
    assert float(out.weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(out.global_state[layout.param_mask()].double().norm()) <= clip_threshold(t) + 1e-3 * 5


def test_from_config_and_validation() -> None:
    from spmc.config import Experiment

    crfl = build_as("crfl", Experiment(rounds=7, seed=4, crfl_sigma=0.01, crfl_clip_cap=30.0, crfl_scale=2.0))
    assert (crfl.options.rounds, crfl.seed, crfl.options.sigma, crfl.options.clip_cap, crfl.options.scale) == (
        7,
        4,
        0.01,
        30.0,
        2.0,
    )
    with pytest.raises(ValueError, match="rounds"):
        CRFL(CRFLOptions(rounds=0))
    for field, kwargs in (
        ("crfl_clip_cap", {"clip_cap": 0.0}),
        ("crfl_clip_slope", {"clip_slope": -1.0}),
        ("crfl_clip_bias", {"clip_bias": 0.0}),
        ("crfl_sigma", {"sigma": -1.0}),
        ("crfl_scale", {"scale": 0.0}),
    ):
        with pytest.raises(ValueError, match=field):
            CRFL(CRFLOptions(**kwargs))
