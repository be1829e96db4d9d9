"""RLR (spec §6.6): sign agreement, flipped learning rate, p-weighted buffers, ids mapped correctly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from spmc.config import build_as
from spmc.defenses.base import RoundInputs
from spmc.defenses.rlr import RLR, RLROptions, robust_learning_rates, sign_agreement
from spmc.params import ParamLayout


def bn_layout() -> ParamLayout:
    """Linear(2, 2) + BatchNorm1d(2): 10 parameter entries, 4 float-buffer entries, 1 counter (d = 15)."""
    return ParamLayout.from_module(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))


def inputs_for(
    layout: ParamLayout, g: torch.Tensor, states: torch.Tensor, ids: list[int], counts: list[float]
) -> RoundInputs:
    return RoundInputs(g, states, tuple(ids), torch.tensor(counts, dtype=torch.float64), layout, 0)


def test_sign_agreement_with_zeros() -> None:
    updates = torch.tensor(
        [
            [1.0, 1.0, 2.0, 0.5, -1.0],
            [2.0, -1.0, 1.0, 0.5, -2.0],
            [3.0, 1.0, 0.0, 0.5, 1.0],
            [4.0, -1.0, 0.0, 0.5, -3.0],
            [5.0, 1.0, 0.0, 0.0, -4.0],
        ]
    )
    assert sign_agreement(updates).tolist() == [5.0, 1.0, 2.0, 4.0, 3.0]  # sign(0) = 0
    assert robust_learning_rates(updates, threshold=4.0, server_lr=0.5).tolist() == [0.5, -0.5, -0.5, 0.5, -0.5]


def test_hand_example_flips_coordinates_without_agreement() -> None:
    layout = ParamLayout.from_module(nn.Linear(2, 1))  # params w0, w1, b
    g = torch.tensor([1.0, 1.0, 1.0])
    deltas = torch.tensor(
        [
            [1.0, 1.0, 0.0],
            [1.0, -1.0, 0.0],
            [1.0, 1.0, 0.0],
            [1.0, -1.0, 1.0],
            [2.0, 1.0, 1.0],
        ]
    )
    counts = [10.0, 10.0, 10.0, 10.0, 60.0]  # p = .1, .1, .1, .1, .6
    out = RLR(RLROptions(threshold=4.0)).aggregate(inputs_for(layout, g, g + deltas, list(range(5)), counts))
    # mean update = (1.6, 0.6, 0.7); agreement (5, 1, 2) → lr = (+1, −1, −1)
    assert torch.allclose(out.global_state, torch.tensor([2.6, 0.4, 0.3]), atol=1e-6)
    assert out.diagnostics["flipped_fraction"] == pytest.approx(2 / 3)
    # With a threshold of 1 every coordinate agrees and RLR is the p-weighted FedAvg.
    plain = RLR(RLROptions(threshold=1.0)).aggregate(inputs_for(layout, g, g + deltas, list(range(5)), counts))
    assert torch.allclose(plain.global_state, torch.tensor([2.6, 1.6, 1.7]), atol=1e-6)


def test_buffers_are_the_weighted_mean_and_ids_follow_the_states() -> None:
    layout = bn_layout()
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(layout.dim, generator=gen)
    states = g + torch.randn(4, layout.dim, generator=gen)
    states[:, layout.int_mask()] = torch.tensor([[3.0], [5.0], [7.0], [9.0]])
    counts = [10.0, 20.0, 30.0, 40.0]
    p = torch.tensor(counts) / 100
    out = RLR(RLROptions(threshold=3.0)).aggregate(inputs_for(layout, g, states, [4, 1, 3, 2], counts))
    buffers = ~layout.param_mask()
    assert torch.allclose(out.global_state[buffers], p @ states[:, buffers], atol=1e-6)
    assert out.global_state[layout.int_mask()].item() == pytest.approx(7.0)
    assert out.diagnostics["weights"] == pytest.approx({"4": 0.1, "1": 0.2, "3": 0.3, "2": 0.4})
    params = layout.param_mask()
    deltas = states[:, params] - g[params]
    lr = torch.where(torch.sign(deltas).sum(0).abs() >= 3.0, 1.0, -1.0)
    assert torch.allclose(out.global_state[params], g[params] + lr * (p @ deltas), atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 8), threshold=st.sampled_from([0.0, 2.0, 4.0]))
def test_permutation_invariance_and_weights(seed: int, n: int, threshold: float) -> None:
    layout = bn_layout()
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(layout.dim, generator=gen)
    states = g + torch.randn(n, layout.dim, generator=gen)
    counts = torch.randint(1, 100, (n,), generator=gen).double().tolist()
    ids = list(range(100, 100 + n))
    rlr = RLR(RLROptions(threshold=threshold))
    out = rlr.aggregate(inputs_for(layout, g, states, ids, counts))
    perm = torch.randperm(n, generator=gen)
    out_p = rlr.aggregate(inputs_for(layout, g, states[perm], [ids[i] for i in perm], [counts[i] for i in perm]))
    assert torch.allclose(out.global_state, out_p.global_state, atol=1e-5)
    assert out.diagnostics["weights"] == pytest.approx(out_p.diagnostics["weights"])
    assert out.weights is not None and bool((out.weights >= 0).all())
    assert float(out.weights.sum()) == pytest.approx(1.0, abs=1e-12)


def test_from_config_and_validation() -> None:
    from spmc.config import Experiment

    rlr = build_as("rlr", Experiment(rlr_threshold=2.0, rlr_server_lr=0.5))
    assert (rlr.options.threshold, rlr.options.server_lr) == (2.0, 0.5)
    with pytest.raises(ValueError, match="rlr_threshold"):
        RLR(RLROptions(threshold=-1.0))
    with pytest.raises(ValueError, match="rlr_server_lr"):
        RLR(RLROptions(server_lr=0.0))
