"""RFA (spec §6.5, D21): smoothed Weiszfeld against hand values and an independent solver (scipy)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize
from torch import nn

from spmc.config import build_as
from spmc.defenses.base import RoundInputs
from spmc.defenses.rfa import RFA, RFAOptions, weiszfeld
from spmc.params import ParamLayout


def bn_layout() -> ParamLayout:
    """Linear(2, 2) + BatchNorm1d(2): params 0.weight (4), 0.bias, 1.weight, 1.bias; float buffers; one counter."""
    return ParamLayout.from_module(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))


def inputs_for(
    layout: ParamLayout, g: torch.Tensor, states: torch.Tensor, ids: list[int], counts: list[float], t: int = 0
) -> RoundInputs:
    return RoundInputs(g, states, tuple(ids), torch.tensor(counts, dtype=torch.float64), layout, t)


def random_round(seed: int, n: int, layout: ParamLayout) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(layout.dim, generator=gen)
    states = g + torch.randn(n, layout.dim, generator=gen)
    int_mask = layout.int_mask()
    g[int_mask] = 7.0
    states[:, int_mask] = 7.0 + torch.randint(0, 20, (n, int(int_mask.sum())), generator=gen).float()
    counts = (torch.randint(10, 100, (n,), generator=gen)).tolist()
    return g, states, counts


def scipy_median(points: np.ndarray, weights: np.ndarray, start: np.ndarray) -> np.ndarray:
    """argmin_z Σ p_k ‖z − x_k‖ by BFGS with the analytic gradient (an independent solver)."""
    p = weights / weights.sum()

    def f(z: np.ndarray) -> tuple[float, np.ndarray]:
        diff = z - points
        dist = np.linalg.norm(diff, axis=1)
        return float(p @ dist), (p / dist) @ diff

    res = minimize(f, start, jac=True, method="BFGS", options={"gtol": 1e-12, "maxiter": 10_000})
    return res.x


def test_one_weiszfeld_step_hand_computed() -> None:
    # Points 0, 1, 10 with p = (.3, .3, .4): z0 = 4.3, then β_k ∝ p_k / |4.3 − x_k|.
    points = torch.tensor([[0.0], [1.0], [10.0]], dtype=torch.float64)
    p = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    z, beta, steps = weiszfeld(points, p, maxiter=1)
    f = Fraction
    raw = [f(3, 10) / f(43, 10), f(3, 10) / f(33, 10), f(4, 10) / f(57, 10)]
    expected_beta = [r / sum(raw) for r in raw]
    expected_z = expected_beta[1] * 1 + expected_beta[2] * 10
    assert steps == 1
    assert beta.tolist() == pytest.approx([float(b) for b in expected_beta], abs=1e-14)
    assert float(z[0]) == pytest.approx(float(expected_z), abs=1e-13)


def test_collinear_points_converge_to_the_weighted_median() -> None:
    # On a line, the geometric median is the weighted median: cumulative p = .3, .6, 1 → the middle point (t = 1).
    layout = ParamLayout.from_module(nn.Linear(2, 1))  # 3 params, no buffers
    direction = torch.tensor([2.0, -1.0, 2.0]) / 3.0  # unit vector
    g = torch.tensor([0.5, 0.25, -1.0])
    states = g + torch.tensor([0.0, 1.0, 10.0]).unsqueeze(1) * direction
    inputs = inputs_for(layout, g, states, [0, 1, 2], [30, 30, 40])
    out = RFA(RFAOptions(layerwise=False, maxiter=200, ftol=0.0)).aggregate(inputs)
    assert torch.allclose(out.global_state, g + direction, atol=1e-4)
    # The default three steps stop well short of the median but move from the mean (t = 4.3) towards it.
    out3 = RFA(RFAOptions(layerwise=False)).aggregate(inputs)
    t3 = float((out3.global_state - g) @ direction)
    assert 1.0 < t3 < 4.3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whole_vector_median_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    layout = ParamLayout.from_module(nn.Linear(4, 1))  # 5 params
    n = 7
    points = rng.normal(size=(n, 5)) * rng.uniform(0.5, 3.0, size=(n, 1))
    counts = rng.integers(5, 50, size=n).astype(float)
    g = torch.zeros(5)
    inputs = inputs_for(layout, g, torch.tensor(points, dtype=torch.float32), list(range(n)), counts.tolist())
    out = RFA(RFAOptions(layerwise=False, maxiter=500, ftol=0.0)).aggregate(inputs)
    ref = scipy_median(points.astype(np.float32).astype(np.float64), counts, np.median(points, axis=0))
    assert np.allclose(out.global_state.numpy(), ref, atol=1e-5)
    assert out.weights is not None
    assert float(out.weights.sum()) == pytest.approx(1.0, abs=1e-12)


def test_layerwise_is_one_median_per_tensor_and_the_counter_gets_the_mean() -> None:
    layout = bn_layout()
    g, states, counts = random_round(3, 6, layout)
    out = RFA(RFAOptions(layerwise=True, maxiter=500, ftol=0.0)).aggregate(
        inputs_for(layout, g, states, list(range(6)), counts)
    )
    c = np.array(counts, dtype=float)
    for e in layout.entries:
        got = out.global_state[e.slice].numpy().astype(np.float64)
        if e.kind.value == "int_buffer":
            expected = (c / c.sum()) @ states[:, e.slice].double().numpy()
            assert np.allclose(got, expected, atol=1e-5)
            continue
        pts = (states[:, e.slice] - g[e.slice]).double().numpy()
        ref = g[e.slice].double().numpy() + scipy_median(pts, c, np.zeros(e.numel))
        assert np.allclose(got, ref, atol=1e-5), e.name
    assert out.weights is None


def test_whole_vector_differs_from_layerwise() -> None:
    layout = bn_layout()
    g, states, counts = random_round(4, 5, layout)
    inputs = inputs_for(layout, g, states, list(range(5)), counts)
    a = RFA(RFAOptions(layerwise=True)).aggregate(inputs).global_state
    b = RFA(RFAOptions(layerwise=False)).aggregate(inputs).global_state
    assert not torch.allclose(a, b)
    int_mask = layout.int_mask()
    assert torch.equal(a[int_mask], b[int_mask])


def test_early_stop_on_the_objective() -> None:
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    p = torch.ones(4)
    assert weiszfeld(points, p, maxiter=3, ftol=1e9)[2] == 1  # any change is below ftol·obj: stop after one step
    assert weiszfeld(points, p, maxiter=3, ftol=0.0)[2] == 3


def test_identical_points_give_that_point() -> None:
    points = torch.tensor([[2.0, -1.0]] * 4)
    z, _, _ = weiszfeld(points, torch.ones(4))
    assert torch.allclose(z, torch.tensor([2.0, -1.0], dtype=torch.float64))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 7), layerwise=st.booleans())
def test_permutation_invariance_and_weights(seed: int, n: int, layerwise: bool) -> None:
    layout = bn_layout()
    g, states, counts = random_round(seed, n, layout)
    ids = [10 + 3 * i for i in range(n)]
    rfa = RFA(RFAOptions(layerwise=layerwise))
    out = rfa.aggregate(inputs_for(layout, g, states, ids, counts))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out_p = rfa.aggregate(inputs_for(layout, g, states[perm], [ids[i] for i in perm], [counts[i] for i in perm]))
    assert torch.allclose(out.global_state, out_p.global_state, atol=1e-5)
    assert set(out.accepted) == set(ids)
    if out.weights is not None:
        assert bool((out.weights >= 0).all()) and float(out.weights.sum()) == pytest.approx(1.0, abs=1e-9)
        assert out.diagnostics["weights"] == pytest.approx(
            {str(ids[i]): w for i, w in zip(perm.tolist(), out_p.weights.tolist())}, abs=1e-6
        )


def test_from_config_and_validation() -> None:
    from spmc.config import Experiment

    rfa = build_as("rfa", Experiment(rfa_layerwise=False, rfa_maxiter=5, rfa_eps=1e-4, rfa_ftol=0.0))
    assert (rfa.options.layerwise, rfa.options.maxiter, rfa.options.eps, rfa.options.ftol) == (False, 5, 1e-4, 0.0)
    with pytest.raises(ValueError, match="rfa_maxiter"):
        RFA(RFAOptions(maxiter=0))
    with pytest.raises(ValueError, match="rfa_eps"):
        RFA(RFAOptions(eps=0.0))
    with pytest.raises(ValueError, match="rfa_ftol"):
        RFA(RFAOptions(ftol=-1.0))
    with pytest.raises(ValueError, match="non-negative"):
        weiszfeld(torch.zeros(2, 3), torch.tensor([1.0, -1.0]))
