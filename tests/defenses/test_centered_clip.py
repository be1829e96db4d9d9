"""Centered clipping (Karimireddy et al., ICML 2021; ATTACKS.md §A6): closed form for L = 1, the mean for τ = ∞, the
τ/n bound on an outlier's pull, the centre kept across rounds and through checkpoints."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc import make_experiment
from spmc.config import build_defense
from spmc.defenses import Stateful
from spmc.defenses.centered_clip import (
    SERVER_KEY,
    CenteredClip,
    CenteredClipOptions,
    centered_clip,
    centered_clip_step,
)

from ._helpers import BN, LINEAR, make_inputs

G = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
U = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0], [0.0, 2.0, 0.0]], dtype=torch.float64)


def _clip(z: torch.Tensor, tau: float) -> torch.Tensor:
    norm = float(z.norm())
    return z if norm <= tau else z * (tau / norm)


def test_one_iteration_from_zero_equals_the_closed_form() -> None:
    cc = CenteredClip(CenteredClipOptions(tau=2.0, iters=1))
    agg = cc.aggregate(make_inputs(G + U, global_state=G))
    # v_1 = (1/3) Σ clip(u_k, 2) = ((1.2, 1.6, 0) + (0, 0, 1) + (0, 2, 0)) / 3
    v1 = torch.tensor([1.2, 3.6, 1.0], dtype=torch.float64) / 3
    assert torch.allclose(agg.global_state, G + v1, atol=1e-12)
    assert agg.diagnostics["clipped"] == [0]
    assert cc.center is not None and torch.allclose(cc.center, v1, atol=1e-12)


def test_the_next_round_starts_from_the_last_aggregate_update() -> None:
    cc = CenteredClip(CenteredClipOptions(tau=2.0, iters=1))
    cc.aggregate(make_inputs(G + U, global_state=G))
    v1 = cc.center
    assert v1 is not None
    g2 = G + v1
    u2 = torch.tensor([[0.0, 10.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    agg = cc.aggregate(make_inputs(g2 + u2, global_state=g2, round_index=1))
    v2 = v1 + sum(_clip(u - v1, 2.0) for u in u2) / 3
    assert torch.allclose(agg.global_state, g2 + v2, atol=1e-12)


def test_several_iterations_follow_the_recursion() -> None:
    v = torch.zeros(3, dtype=torch.float64)
    for _ in range(4):
        v = v + sum(_clip(u - v, 1.5) for u in U) / 3
    got, _ = centered_clip(U, torch.zeros(3, dtype=torch.float64), 1.5, 4)
    assert torch.allclose(got, v, atol=1e-12)


def test_infinite_tau_is_the_mean() -> None:
    agg = CenteredClip(CenteredClipOptions(tau=float("inf"), iters=3)).aggregate(make_inputs(G + U, global_state=G))
    assert torch.allclose(agg.global_state, G + U.mean(0), atol=1e-12)
    assert agg.diagnostics["clipped"] == []


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 9), seed=st.integers(0, 10_000), tau=st.floats(0.1, 5.0), bad=st.integers(0, 8))
def test_a_far_outlier_moves_v_by_tau_over_n(n: int, seed: int, tau: float, bad: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    updates = torch.randn(n, LINEAR.dim, generator=gen, dtype=torch.float64)
    center = torch.randn(LINEAR.dim, generator=gen, dtype=torch.float64)
    bad = bad % n
    updates[bad] = 1e8 * torch.randn(LINEAR.dim, generator=gen, dtype=torch.float64)
    v, factors = centered_clip_step(updates, center, tau)
    rest = center + sum(_clip(updates[k] - center, tau) for k in range(n) if k != bad) / n
    assert float((v - rest).norm()) == pytest.approx(tau / n, rel=1e-9)
    assert float(factors[bad]) < 1e-6
    assert float((v - center).norm()) <= tau * (1 + 1e-12)  # one iteration moves v by at most τ


def test_state_round_trips_through_a_checkpoint() -> None:
    inputs = [make_inputs(G + U * (r + 1), global_state=G, round_index=r) for r in range(3)]
    straight = CenteredClip(CenteredClipOptions(tau=1.0))
    assert straight.state_dict() == {}
    for x in inputs:
        last = straight.aggregate(x)
    resumed = CenteredClip(CenteredClipOptions(tau=1.0))
    resumed.aggregate(inputs[0])
    saved = {str(k): v for k, v in resumed.state_dict().items()}  # the checkpoint writes string keys
    assert list(saved) == [str(SERVER_KEY)]
    fresh = CenteredClip(CenteredClipOptions(tau=1.0))
    fresh.load_state_dict(saved)
    fresh.aggregate(inputs[1])
    assert torch.equal(fresh.aggregate(inputs[2]).global_state, last.global_state)
    assert isinstance(fresh, Stateful)


def test_bad_states_are_refused() -> None:
    cc = CenteredClip()
    with pytest.raises(ValueError, match="unexpected key"):
        cc.load_state_dict({3: torch.zeros(3)})
    with pytest.raises(ValueError, match="1-D"):
        cc.load_state_dict({SERVER_KEY: torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="non-finite"):
        cc.load_state_dict({SERVER_KEY: torch.tensor([0.0, float("nan"), 0.0])})
    cc.load_state_dict({SERVER_KEY: torch.zeros(5)})
    with pytest.raises(ValueError, match="another model"):
        cc.aggregate(make_inputs(G + U, global_state=G))


def test_counters_are_averaged_and_left_out() -> None:
    states = torch.zeros(3, BN.dim)
    states[:, 0] = torch.tensor([1.0, 2.0, 30.0])
    states[:, -1] = torch.tensor([5.0, 5.0, 500.0])
    agg = CenteredClip(CenteredClipOptions(tau=2.0)).aggregate(make_inputs(states, layout=BN))
    assert agg.global_state[0].item() == pytest.approx((1 + 2 + 2) / 3)
    assert agg.global_state[-1].item() == pytest.approx(170.0)


def test_options_and_config() -> None:
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="cc_tau"):
            CenteredClipOptions(tau=bad)
    for bad_iters in (0, -1, True):
        with pytest.raises(ValueError, match="cc_iters"):
            CenteredClipOptions(iters=bad_iters)
    defense = build_defense(make_experiment(defense="centered_clip", cc_tau=3.0, cc_iters=2))
    assert isinstance(defense, CenteredClip) and (defense.options.tau, defense.options.iters) == (3.0, 2)
