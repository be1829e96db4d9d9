"""``lie`` (ATTACKS.md §A4): z for K = 10, m = 3 by hand, the crafted vector on 3-d updates, the fallbacks,
options, finite output and the effect on a run."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc.attacks.lie import Lie, LieOptions, lie_z
from spmc.threat import ThreatModel

from ._crafting_helpers import make_inputs, smoke_round

# 7 benign 3-d updates. Coordinate 0: 1 … 7 (μ = 4, sample σ = √(28/6)); coordinate 1: all 1 (μ = 1, σ = 0);
# coordinate 2: −1, 1, −1, 1, −1, 1, 0 (μ = 0, sample σ = √(6/6) = 1; the population σ would be √(6/7)).
UPDATES = torch.tensor(
    [[1.0, 1, -1], [2, 1, 1], [3, 1, -1], [4, 1, 1], [5, 1, -1], [6, 1, 1], [7, 1, 0]], dtype=torch.float64
)
G = torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)


def test_z_for_k10_m3_by_hand() -> None:
    # s = ⌊10/2 + 1⌋ − 3 = 3; z = Φ⁻¹((10 − 3)/10) = Φ⁻¹(0.7) ≈ 0.5244
    assert lie_z(10, 3) == pytest.approx(0.5244005127, abs=1e-9)


def test_z_edge_cases() -> None:
    assert lie_z(4, 3) == pytest.approx(0.6744897502)  # s = 3 − 3 = 0 ≤ 0: s = 1, Φ⁻¹(3/4)
    assert lie_z(2, 1) == 0.0  # s = 1, Φ⁻¹(1/2)
    assert lie_z(1, 1) == 0.0  # a lone attacker: s = 1 = K, no deviation
    assert lie_z(50, 24) == pytest.approx(1.7506860713)  # s = 2: Φ⁻¹(0.96) (the paper's n = 50 example)
    assert all(math.isfinite(lie_z(k, m)) and lie_z(k, m) >= 0 for k in range(1, 40) for m in range(1, k + 1))
    with pytest.raises(ValueError, match="K = 3, m = 4"):
        lie_z(3, 4)


def test_crafted_vector_for_k10_m3_on_3d_updates() -> None:
    attackers = torch.zeros(3, 3, dtype=torch.float64) + G  # their own states do not matter
    out = Lie().craft(make_inputs(attackers, G + UPDATES, G))
    z = 0.5244005127080407
    expected = [10 + 4 - z * math.sqrt(28 / 6), 21.0, 30 - z * 1.0]
    assert out.shape == (3, 3)
    for row in out:
        assert row.tolist() == pytest.approx(expected, abs=1e-12)


def test_lie_z_option_overrides_and_is_validated() -> None:
    out = Lie(options=LieOptions(2.0)).craft(make_inputs(G[None, :], G + UPDATES, G))
    assert out[0].tolist() == pytest.approx([14 - 2 * math.sqrt(28 / 6), 21.0, 28.0])
    for bad in (float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match=r"^lie_z: got .*; must be a finite number or None"):
            LieOptions(bad)


def test_without_benign_clients_the_attackers_estimate() -> None:
    # K = m = 2: z = 0, so every attacker sends θ_g + the mean of the attackers' own updates
    attackers = torch.tensor([[1.0, 3.0], [3.0, 5.0]])
    out = Lie().craft(make_inputs(attackers, None, torch.zeros(2)))
    assert out.tolist() == [[2.0, 4.0], [2.0, 4.0]]
    # one benign update: σ = 0 (no NaN), the attackers copy it
    out = Lie().craft(make_inputs(attackers, torch.tensor([[7.0, -1.0]]), torch.zeros(2)))
    assert out.tolist() == [[7.0, -1.0], [7.0, -1.0]]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 6), m=st.integers(1, 4), scale=st.floats(0, 3e38), seed=st.integers(0, 1000))
def test_lie_output_is_finite(n: int, m: int, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    states = (torch.rand(n + m + 1, 6, generator=gen) * 2 - 1) * scale
    out = Lie().craft(make_inputs(states[:m], states[m : m + n], states[-1]))
    assert out.shape == (m, 6) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())


def test_lie_on_a_smoke_run() -> None:
    run = smoke_round("lie")
    attacker = run.ids.index(run.attackers[0])
    benign = torch.stack([run.trained[i] for i, k in enumerate(run.ids) if k not in run.attackers])
    u = benign.to(torch.float64) - run.global_state.to(torch.float64)
    expected = run.global_state.to(torch.float64) + u.mean(0) - lie_z(4, 1) * u.std(0)  # K = 4, m = 1: s = 2
    assert torch.allclose(run.received[attacker].to(torch.float64), expected, atol=1e-6)
    assert not torch.allclose(run.received[attacker], run.trained[attacker], atol=1e-5)
    assert not torch.allclose(run.new_global, run.clean_global, atol=1e-6)


def test_k_under_partial_knowledge_is_the_runs() -> None:
    # partial: the benign rows are the attackers' clean estimates and carry no ids; K is the run's (10), m = 3
    estimates = G + UPDATES[:3]
    inputs = dataclasses.replace(make_inputs(G.repeat(3, 1), estimates, G), benign_ids=())
    lie = Lie(threat=ThreatModel(num_clients=10, gamma=0.3))
    assert lie.z(inputs) == pytest.approx(lie_z(10, 3))
    assert lie.z(make_inputs(G.repeat(3, 1), G + UPDATES, G)) == pytest.approx(lie_z(10, 3))  # full: 7 + 3
    assert lie.z(make_inputs(G.repeat(3, 1), None, G)) == pytest.approx(lie_z(3, 3))  # only attackers answer
