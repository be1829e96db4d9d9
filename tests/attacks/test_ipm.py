"""``ipm`` (ATTACKS.md §A4): θ_g − ε·μ exactly, the fallback, options, finite output and the effect on a run."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc.attacks.ipm import Ipm, IpmOptions

from ._crafting_helpers import make_inputs, smoke_round


def test_ipm_exact() -> None:
    g = torch.tensor([1.0, 2.0, -3.0])
    benign = g + torch.tensor([[2.0, 0.0, -4.0], [6.0, -8.0, 0.0]])  # μ = (4, −4, −2)
    attackers = torch.tensor([[100.0, 100.0, 100.0], [5.0, 5.0, 5.0]])  # ignored
    out = Ipm(options=IpmOptions(0.5)).craft(make_inputs(attackers, benign, g))
    assert out.tolist() == [[-1.0, 4.0, -2.0], [-1.0, 4.0, -2.0]]  # θ_g − 0.5 μ
    assert Ipm().options.eps == 0.1
    out = Ipm().craft(make_inputs(attackers[:1], benign, g))
    assert out[0].tolist() == pytest.approx([0.6, 2.4, -2.8])


def test_ipm_without_benign_clients_uses_the_attackers_updates() -> None:
    attackers = torch.tensor([[2.0, 0.0], [4.0, 2.0]])  # μ = (3, 1)
    out = Ipm(options=IpmOptions(100.0)).craft(make_inputs(attackers, None, torch.zeros(2)))
    assert out.tolist() == [[-300.0, -100.0], [-300.0, -100.0]]


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf")])
def test_ipm_eps_is_validated(bad: float) -> None:
    with pytest.raises(ValueError, match=r"^ipm_eps: got .*; must be a finite number > 0$"):
        IpmOptions(bad)


@settings(max_examples=30, deadline=None)
@given(eps=st.floats(1e-3, 1e6), n=st.integers(0, 5), scale=st.floats(0, 3e38), seed=st.integers(0, 1000))
def test_ipm_output_is_finite(eps: float, n: int, scale: float, seed: int) -> None:
    states = (torch.rand(n + 3, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * scale
    out = Ipm(options=IpmOptions(eps)).craft(make_inputs(states[:2], states[2 : 2 + n], states[-1]))
    assert out.shape == (2, 4) and bool(torch.isfinite(out).all())


def test_ipm_on_a_smoke_run() -> None:
    run = smoke_round("ipm")
    attacker = run.ids.index(run.attackers[0])
    benign = torch.stack([run.trained[i] for i, k in enumerate(run.ids) if k not in run.attackers])
    expected = run.global_state - 0.1 * (benign - run.global_state).mean(0)
    assert torch.allclose(run.received[attacker], expected, atol=1e-7)
    assert not torch.allclose(run.new_global, run.clean_global, atol=1e-6)
