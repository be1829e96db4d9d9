"""RSA (spec §6.9, D25): saturating sign accumulator in client-id order, server step, BN buffers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from spmc.config import build_as
from spmc.defenses.base import RoundInputs
from spmc.defenses.rsa import RSA, RSAOptions, clipped_sign_sum, rsa_step
from spmc.params import ParamLayout


def bn_layout() -> ParamLayout:
    return ParamLayout.from_module(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))


def inputs_for(
    layout: ParamLayout, g: torch.Tensor, states: torch.Tensor, ids: list[int], counts: list[float] | None = None
) -> RoundInputs:
    c = torch.ones(len(ids), dtype=torch.float64) if counts is None else torch.tensor(counts, dtype=torch.float64)
    return RoundInputs(g, states, tuple(ids), c, layout, 0)


def test_clip_bites_after_every_addition() -> None:
    g = torch.zeros(3)
    # coordinate 0: five clients below the global → five +1 signs, saturating at 3 (unclipped sum: 5)
    # coordinate 1: signs +,+,+,+,−,− → 1,2,3,3,2,1 → 1 (unclipped sum: 2)
    # coordinate 2: signs −,−,+,+,+,+ → −1,−2,−1,0,1,2 → 2 (the same multiset as coordinate 1 in another order)
    x = torch.tensor(
        [
            [-1.0, -1.0, 1.0],
            [-1.0, -1.0, 1.0],
            [-1.0, -1.0, -1.0],
            [-1.0, -1.0, -1.0],
            [-1.0, 1.0, -1.0],
            [0.0, 1.0, -1.0],
        ]
    )
    assert clipped_sign_sum(g, x, clip=3.0).tolist() == [3.0, 1.0, 2.0]
    assert clipped_sign_sum(g, x, clip=10.0).tolist() == [5.0, 2.0, 2.0]


def test_server_step_hand_computed() -> None:
    x = torch.tensor([1.0, -2.0, 0.5])
    acc = torch.tensor([3.0, -1.0, 0.0])
    out = rsa_step(x, acc, alpha=0.05, lam=0.1, wd=0.001)
    expected = [1.0 - 0.05 * (0.3 + 0.001), -2.0 - 0.05 * (-0.1 - 0.002), 0.5 - 0.05 * 0.0005]
    assert out.tolist() == pytest.approx(expected, abs=1e-7)


def test_clients_are_visited_in_id_order_whatever_the_input_order() -> None:
    layout = ParamLayout.from_module(nn.Linear(1, 1))  # 2 params
    g = torch.zeros(2)
    # by id: signs on coordinate 0 are −,−,+,+,+,+ → 2 with the clip; in reverse order +,+,+,+,−,− → 1
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    ids = [0, 1, 2, 3, 4, 5]
    rsa = RSA(RSAOptions(alpha=1.0, lam=1.0, wd=0.0))
    forward = rsa.aggregate(inputs_for(layout, g, x, ids))
    backward = rsa.aggregate(inputs_for(layout, g, x.flip(0), ids[::-1]))
    assert forward.global_state.tolist() == [-2.0, 0.0]  # x_g − α λ acc with acc = (2, 0)
    assert torch.equal(forward.global_state, backward.global_state)
    # relabel the ids so the +1 signs come first: now the clip yields 1
    relabelled = rsa.aggregate(inputs_for(layout, g, x, [5, 4, 3, 2, 1, 0]))
    assert relabelled.global_state.tolist() == [-1.0, 0.0]


def test_bn_buffers_uniform_mean_or_unchanged() -> None:
    layout = bn_layout()
    params = layout.param_mask()
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(layout.dim, generator=gen)
    states = g + torch.randn(3, layout.dim, generator=gen)
    counts = [1.0, 10.0, 100.0]  # ignored: RSA's buffers use a uniform mean
    on = RSA().aggregate(inputs_for(layout, g, states, [0, 1, 2], counts))
    assert torch.allclose(on.global_state[~params], states[:, ~params].mean(0), atol=1e-6)
    off = RSA(RSAOptions(update_bn_buffers=False)).aggregate(inputs_for(layout, g, states, [0, 1, 2], counts))
    assert torch.equal(off.global_state[~params], g[~params])
    assert torch.equal(on.global_state[params], off.global_state[params])
    acc = clipped_sign_sum(g[params], states[:, params])
    assert torch.allclose(on.global_state[params], g[params] - 0.05 * (0.1 * acc + 0.001 * g[params]), atol=1e-7)
    assert on.weights is None and on.accepted == (0, 1, 2)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 9))
def test_permutation_invariance_and_bounded_step(seed: int, n: int) -> None:
    layout = bn_layout()
    params = layout.param_mask()
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(layout.dim, generator=gen)
    states = g + torch.randn(n, layout.dim, generator=gen)
    ids = torch.randperm(50, generator=gen)[:n].tolist()
    rsa = RSA()
    out = rsa.aggregate(inputs_for(layout, g, states, ids))
    perm = torch.randperm(n, generator=gen)
    out_p = rsa.aggregate(inputs_for(layout, g, states[perm], [ids[i] for i in perm]))
    assert torch.allclose(out.global_state, out_p.global_state, atol=1e-6)
    step = (out.global_state[params] - g[params]).abs()
    assert bool((step <= 0.05 * (0.1 * 3 + 0.001 * g[params].abs()) + 1e-6).all())


def test_from_config_and_validation() -> None:
    from spmc.config import Experiment

    rsa = build_as("rsa", Experiment(rsa_alpha=0.1, rsa_lambda=0.5, rsa_wd=0.01, rsa_clip=2.0))
    assert (rsa.options.alpha, rsa.options.lam, rsa.options.wd, rsa.options.clip, rsa.options.update_bn_buffers) == (
        0.1,
        0.5,
        0.01,
        2.0,
        True,
    )
    assert build_as("rsa", Experiment(rsa_update_bn_buffers=False)).options.update_bn_buffers is False
    for field, kwargs in (
        ("rsa_alpha", {"alpha": 0.0}),
        ("rsa_lambda", {"lam": -1.0}),
        ("rsa_wd", {"wd": -1.0}),
        ("rsa_clip", {"clip": 0.0}),
    ):
        with pytest.raises(ValueError, match=field):
            RSA(RSAOptions(**kwargs))
