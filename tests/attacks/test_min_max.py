"""``min_max`` (ATTACKS.md §A4): λ against a brute-force grid for every perturbation, the constraint at the returned
λ, the search's range, options, finite output and the effect on a run. ``min_sum`` has its own file."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc.attacks.min_max import MinMax, MinMaxOptions, geometry, search_lambda
from spmc.attacks.min_sum import MinSum

from ._crafting_helpers import make_inputs, smoke_round

# 4 benign 3-d updates around θ_g; μ = (1.5, 0.75, 0.25)
BENIGN = torch.tensor([[1.0, 0.0, 0.0], [2.0, 1.0, 0.0], [1.0, 2.0, 1.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
G = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)


def direction(updates: np.ndarray, perturbation: str) -> np.ndarray:
    mu = updates.mean(0)
    if perturbation == "unit":
        return -mu / np.linalg.norm(mu)
    if perturbation == "std":
        return -updates.std(0, ddof=1)
    return -np.sign(mu)


def objective_value(updates: np.ndarray, candidates: np.ndarray, objective: str) -> tuple[np.ndarray, float]:
    """The constraint's left side for every candidate row [k, d], and its bound, computed directly."""
    dist = np.linalg.norm(candidates[:, None, :] - updates[None, :, :], axis=2)  # [k, n]
    pair = np.linalg.norm(updates[:, None, :] - updates[None, :, :], axis=2)
    if objective == "min_max":
        return dist.max(1), float(pair.max())
    return (dist**2).sum(1), float((pair**2).sum(1).max())


def brute_force(updates: np.ndarray, perturbation: str, objective: str, top: float, step: float) -> float:
    """The largest λ on the grid 0, step, … < top whose u_m = μ + λp satisfies the constraint."""
    grid = np.arange(0.0, top, step)
    candidates = updates.mean(0)[None, :] + grid[:, None] * direction(updates, perturbation)[None, :]
    value, bound = objective_value(updates, candidates, objective)
    ok = value <= bound * (1 + 1e-12)
    assert ok[0], "λ = 0 must be feasible"
    return float(grid[ok].max())


def crafted_lambda(out: torch.Tensor, updates: torch.Tensor, global_state: torch.Tensor, perturbation: str) -> float:
    u = updates.numpy()
    p = direction(u, perturbation)
    delta = (out - global_state).numpy() - u.mean(0)
    return float(delta @ p / (p @ p))


@pytest.mark.parametrize("perturbation", ["unit", "std", "sign"])
@pytest.mark.parametrize("objective", ["min_max", "min_sum"])
def test_lambda_matches_a_brute_force_search(perturbation: str, objective: str) -> None:
    cls = MinMax if objective == "min_max" else MinSum
    out = cls(options=MinMaxOptions(perturbation)).craft(make_inputs(G.repeat(2, 1), G + BENIGN, G))
    assert out.shape == (2, 3) and torch.equal(out[0], out[1])
    lam = crafted_lambda(out[0], BENIGN, G, perturbation)
    truth = brute_force(BENIGN.numpy(), perturbation, objective, top=20.0, step=1e-5)
    assert 0.1 < truth < 19.0  # an interior answer, inside the search range [0, 2λ₀)
    assert lam == pytest.approx(truth, abs=3e-5)
    assert lam <= truth + 1e-5  # never beyond the feasible set (up to the grid step)
    value, bound = objective_value(BENIGN.numpy(), (out[0] - G).numpy()[None, :], objective)
    assert value[0] <= bound * (1 + 1e-9)  # the constraint holds at the returned λ
    expected = G.numpy() + BENIGN.numpy().mean(0) + lam * direction(BENIGN.numpy(), perturbation)
    assert np.allclose(out[0].numpy(), expected, atol=1e-12)


def test_min_max_lambda_by_hand_in_one_dimension() -> None:
    # updates 0 and 2 on one axis: μ = 1, p = −1 (unit); spread 2; max_i |1 − λ − u_i| = 1 + λ ≤ 2 → λ* = 1
    benign = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    lam = search_lambda(geometry(benign, torch.zeros(1, dtype=torch.float64), "unit"), "min_max", 10.0, 1e-5)
    assert lam == pytest.approx(1.0, abs=2e-5) and lam <= 1.0


def test_search_is_capped_at_twice_lambda_init_and_stops_at_zero() -> None:
    geo = geometry(G + BENIGN, G, "unit")
    lam = search_lambda(geo, "min_max", 0.1, 1e-5)  # the true λ* (≈ 1.7) is beyond 2λ₀ = 0.2
    assert 0.2 - 3e-5 <= lam < 0.2
    same = torch.ones(3, 2, dtype=torch.float64)  # identical benign updates: only λ = 0 is feasible
    assert search_lambda(geometry(same, torch.zeros(2, dtype=torch.float64), "unit"), "min_max", 10.0, 1e-5) == 0.0
    out = MinMax().craft(make_inputs(torch.zeros(1, 2), same.float(), torch.zeros(2)))
    assert out.tolist() == [[1.0, 1.0]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"perturbation": "cube"}, r"^perturbation: got 'cube'; allowed: unit, std, sign$"),
        ({"lambda_init": 0.0}, r"^minmax_lambda_init: got 0.0; must be a finite number > 0$"),
        ({"lambda_init": float("inf")}, r"^minmax_lambda_init: got inf"),
        ({"tol": -1e-5}, r"^minmax_tol: got -1e-05; must be a finite number > 0$"),
    ],
)
def test_options_are_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MinMaxOptions(**kwargs)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 6),
    d=st.integers(1, 8),
    seed=st.integers(0, 10_000),
    perturbation=st.sampled_from(["unit", "std", "sign"]),
    objective=st.sampled_from(["min_max", "min_sum"]),
)
def test_returned_lambda_is_feasible_and_maximal(n: int, d: int, seed: int, perturbation: str, objective: str) -> None:
    u = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    geo = geometry(u, torch.zeros(d, dtype=torch.float64), perturbation)
    lam = search_lambda(geo, objective, 10.0, 1e-5)
    p = direction(u.numpy(), perturbation)
    mu = u.numpy().mean(0)
    value, bound = objective_value(u.numpy(), np.stack([mu + lam * p, mu + (lam + 1e-4) * p]), objective)
    assert value[0] <= bound * (1 + 1e-9) + 1e-12
    if lam + 1e-4 < 20.0 - 1e-4:
        assert value[1] > bound


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 5), m=st.integers(1, 3), scale=st.floats(0, 3e38), seed=st.integers(0, 1000))
def test_min_max_output_is_finite(n: int, m: int, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    states = (torch.rand(n + m + 1, 5, generator=gen) * 2 - 1) * scale
    for perturbation in ("unit", "std", "sign"):
        out = MinMax(options=MinMaxOptions(perturbation)).craft(make_inputs(states[:m], states[m : m + n], states[-1]))
        assert out.shape == (m, 5) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())


def test_min_max_on_a_smoke_run() -> None:
    run = smoke_round("min_max")
    attacker = run.ids.index(run.attackers[0])
    benign = torch.stack([run.trained[i] for i, k in enumerate(run.ids) if k not in run.attackers])
    u = (benign.to(torch.float64) - run.global_state.to(torch.float64)).numpy()
    crafted = (run.received[attacker].to(torch.float64) - run.global_state.to(torch.float64)).numpy()
    value, bound = objective_value(u, crafted[None, :], "min_max")
    assert value[0] <= bound * (1 + 1e-5)  # within the benign spread (float32 rounding)
    lam = float((crafted - u.mean(0)) @ direction(u, "unit"))
    assert lam > 0.01 and value[0] > 0.999 * bound  # pushed to the edge of the spread
    assert not torch.allclose(run.new_global, run.clean_global, atol=1e-6)
