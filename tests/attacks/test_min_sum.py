"""``min_sum`` (ATTACKS.md §A4): the bisection against the closed form λ* = √((bound − Σ‖D_i‖²)/(n‖p‖²)), the
constraint at the returned λ and the effect on a run (the brute-force grid is in ``test_min_max.py``)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc.attacks import ATTACKS
from spmc.attacks.min_max import MinMaxOptions, geometry, search_lambda
from spmc.attacks.min_sum import MinSum

from ._crafting_helpers import make_inputs, smoke_round


def closed_form(u: torch.Tensor, p: torch.Tensor) -> float:
    centred = u - u.mean(0)
    pair = ((u[:, None, :] - u[None, :, :]) ** 2).sum(2)
    bound = float(pair.sum(1).max())
    return math.sqrt(max(bound - float((centred**2).sum()), 0.0) / (u.shape[0] * float((p * p).sum())))


def test_min_sum_by_hand_in_one_dimension() -> None:
    # updates 0 and 2: μ = 1, p = −1; Σ_i (1 − λ − u_i)² = 2 + 2λ² ≤ max_i Σ_j (u_i − u_j)² = 4 → λ* = 1
    benign = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    lam = search_lambda(geometry(benign, torch.zeros(1, dtype=torch.float64), "unit"), "min_sum", 10.0, 1e-5)
    assert lam == pytest.approx(1.0, abs=2e-5) and lam <= 1.0
    out = MinSum().craft(make_inputs(torch.zeros(2, 1), benign.float(), torch.zeros(1)))
    assert out[:, 0].tolist() == pytest.approx([1 - lam, 1 - lam])


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 7),
    d=st.integers(1, 10),
    seed=st.integers(0, 10_000),
    perturbation=st.sampled_from(["unit", "std", "sign"]),
)
def test_bisection_matches_the_closed_form(n: int, d: int, seed: int, perturbation: str) -> None:
    u = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    geo = geometry(u, torch.zeros(d, dtype=torch.float64), perturbation)
    truth = closed_form(u, geo.p)
    lam = search_lambda(geo, "min_sum", 10.0, 1e-5)
    if truth < 20.0 - 1e-4:
        assert lam == pytest.approx(truth, abs=3e-5) and lam <= truth + 1e-9
    else:
        assert lam > 20.0 - 3e-5  # the search range [0, 2λ₀) of the paper


def test_min_sum_is_registered_with_the_shared_options() -> None:
    assert ATTACKS["min_sum"] is MinSum and MinSum.options_type is MinMaxOptions and MinSum.hooks == {"crafting"}
    assert not MinSum.targeted


def test_min_sum_on_a_smoke_run() -> None:
    run = smoke_round("min_sum")
    attacker = run.ids.index(run.attackers[0])
    benign = torch.stack([run.trained[i] for i, k in enumerate(run.ids) if k not in run.attackers])
    u = benign.to(torch.float64) - run.global_state.to(torch.float64)
    crafted = run.received[attacker].to(torch.float64) - run.global_state.to(torch.float64)
    mu = u.mean(0)
    lam = float((crafted - mu) @ (-mu / mu.norm()))
    assert lam == pytest.approx(closed_form(u, mu / mu.norm()), rel=1e-3)
    assert not torch.allclose(run.new_global, run.clean_global, atol=1e-6)
