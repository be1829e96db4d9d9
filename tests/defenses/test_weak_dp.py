"""Weak DP (Sun et al. 2019; ATTACKS.md §A6): norm clipping plus seeded Gaussian noise on the parameters only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spmc import make_experiment
from spmc.config import build_defense
from spmc.defenses.norm_clip import NormClip, NormClipOptions
from spmc.defenses.weak_dp import WeakDP, WeakDPOptions
from spmc.params import ParamLayout
from spmc.threat import ThreatModel

from ._helpers import BN, make_inputs

WIDE = ParamLayout.from_module(nn.Linear(200, 20))  # 4,020 parameters


def _states(n: int, layout: ParamLayout, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, layout.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_zero_sigma_is_norm_clipping() -> None:
    inputs = make_inputs(_states(5, BN), layout=BN)
    a = WeakDP(WeakDPOptions(sigma=0.0, clip_norm=0.7)).aggregate(inputs)
    b = NormClip(NormClipOptions(clip_norm=0.7)).aggregate(inputs)
    assert torch.equal(a.global_state, b.global_state)


def test_noise_has_std_sigma_on_the_parameters_only() -> None:
    inputs = make_inputs(_states(4, WIDE), layout=WIDE)
    plain = NormClip().aggregate(inputs).global_state
    noise = WeakDP(WeakDPOptions(sigma=0.5)).aggregate(inputs).global_state - plain
    assert float(noise.std()) == pytest.approx(0.5, rel=0.05)
    assert abs(float(noise.mean())) < 0.05
    bn_inputs = make_inputs(_states(4, BN), layout=BN)
    bn_noise = WeakDP(WeakDPOptions(sigma=0.5)).aggregate(bn_inputs).global_state
    bn_noise = bn_noise - NormClip().aggregate(bn_inputs).global_state
    params = BN.param_mask()
    assert bool((bn_noise[params] != 0).all())
    assert bool((bn_noise[~params] == 0).all())  # running mean/var and the counter are untouched


def test_noise_depends_on_seed_and_round_not_on_client_order() -> None:
    states = _states(5, WIDE)
    ids = (4, 9, 1, 7, 3)
    perm = [2, 0, 4, 1, 3]
    opts = WeakDPOptions(sigma=0.1)
    a = WeakDP(opts, ThreatModel(seed=3)).aggregate(make_inputs(states, ids, layout=WIDE, round_index=2))
    b = WeakDP(opts, ThreatModel(seed=3)).aggregate(
        make_inputs(states[perm], tuple(ids[i] for i in perm), layout=WIDE, round_index=2)
    )
    c = WeakDP(opts, ThreatModel(seed=3)).aggregate(make_inputs(states, ids, layout=WIDE, round_index=3))
    d = WeakDP(opts, ThreatModel(seed=4)).aggregate(make_inputs(states, ids, layout=WIDE, round_index=2))
    assert torch.allclose(a.global_state, b.global_state, atol=1e-12)
    assert not torch.allclose(a.global_state, c.global_state)
    assert not torch.allclose(a.global_state, d.global_state)


def test_options_and_config() -> None:
    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="dp_sigma"):
            WeakDPOptions(sigma=bad)
    with pytest.raises(ValueError, match="clip_norm"):
        WeakDPOptions(clip_norm=-1.0)
    defense = build_defense(make_experiment(defense="weak_dp", dp_sigma=0.01, clip_norm=2.0, seed=5))
    assert isinstance(defense, WeakDP)
    assert (defense.options.sigma, defense.options.clip_norm, defense.seed) == (0.01, 2.0, 5)
