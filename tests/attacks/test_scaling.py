"""``scaling`` (ATTACKS.md §A4): θ_g + Γ·(θ_k − θ_g) exactly, Γ = K/m by default, options, effect on a run."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc.attacks import ATTACKS
from spmc.attacks.scaling import Scaling, ScalingOptions, resolve_scale
from spmc.threat import ThreatModel

from ._crafting_helpers import make_inputs, smoke_round


def test_scaling_formula_by_hand() -> None:
    g = torch.tensor([1.0, -2.0, 0.5])
    attackers = torch.tensor([[2.0, -2.0, 0.0], [1.0, 0.0, 0.5]])
    out = Scaling(options=ScalingOptions(3.0)).craft(make_inputs(attackers, global_state=g))
    # u = (1, 0, −0.5) and (0, 2, 0); θ_g + 3u
    assert out.tolist() == [[4.0, -2.0, -1.0], [1.0, 4.0, 0.5]]
    assert out.dtype == torch.float32


def test_default_gamma_is_k_over_m() -> None:
    assert Scaling(threat=ThreatModel(num_clients=10, gamma=0.3)).gamma == pytest.approx(10 / 3)
    assert Scaling(threat=ThreatModel(num_clients=4, gamma=0.25)).gamma == 4.0
    assert resolve_scale(None, ThreatModel(num_clients=5, attack_active=False)) == 5.0  # m = 0: no division
    assert Scaling(options=ScalingOptions(2.5), threat=ThreatModel(num_clients=10)).gamma == 2.5
    g = torch.zeros(2)
    out = Scaling(threat=ThreatModel(num_clients=10, gamma=0.2)).craft(
        make_inputs(torch.tensor([[1.0, -1.0]]), None, g)
    )
    assert out.tolist() == [[5.0, -5.0]]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), True])
def test_scale_factor_is_validated(bad: float) -> None:
    with pytest.raises(ValueError, match=r"^scale_factor: got .*; must be a finite number > 0 or None \(K/m\)$"):
        ScalingOptions(bad)


@settings(max_examples=30, deadline=None)
@given(gamma=st.floats(1e-3, 1e6), scale=st.floats(0, 3e38), seed=st.integers(0, 1000))
def test_scaling_output_is_finite(gamma: float, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    states = (torch.rand(3, 5, generator=gen) * 2 - 1) * scale
    out = Scaling(options=ScalingOptions(gamma)).craft(make_inputs(states[:2], states[2:], states[2]))
    assert out.shape == (2, 5) and bool(torch.isfinite(out).all())


def test_scaling_on_a_smoke_run() -> None:
    run = smoke_round("scaling")
    assert isinstance(run.sim.federation.attack.update, ATTACKS["scaling"]) and run.attackers == (3,)
    gamma = 4.0  # K = 4, m = 1
    for row, k in enumerate(run.ids):
        expected = run.trained[row]
        if k in run.attackers:
            expected = run.global_state + gamma * (run.trained[row] - run.global_state)
        assert torch.allclose(run.received[row], expected, atol=1e-6), k
    assert not torch.allclose(run.new_global, run.clean_global, atol=1e-5)
