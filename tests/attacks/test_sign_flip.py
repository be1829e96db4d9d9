"""``sign_flip`` (ATTACKS.md §A4): θ_g − (θ_k − θ_g) exactly, finite output and the effect on a run."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc.attacks import ATTACKS
from spmc.attacks.sign_flip import SignFlip

from ._crafting_helpers import make_inputs, smoke_round


def test_sign_flip_exact() -> None:
    g = torch.tensor([1.0, -2.0, 0.5])
    attackers = torch.tensor([[2.0, -2.0, 0.0], [-1.0, 1.0, 0.5]])  # u = (1, 0, −0.5), (−2, 3, 0)
    benign = torch.full((3, 3), 99.0)  # not read
    out = SignFlip().craft(make_inputs(attackers, benign, g))
    assert out.tolist() == [[0.0, -2.0, 1.0], [3.0, -5.0, 0.5]]
    assert out.dtype == attackers.dtype
    assert SignFlip.options_type is None and not SignFlip.targeted and SignFlip.hooks == {"crafting"}


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(0, 3e38), seed=st.integers(0, 1000))
def test_sign_flip_output_is_finite(scale: float, seed: int) -> None:
    states = (torch.rand(3, 5, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * scale
    out = SignFlip().craft(make_inputs(states[:2], None, states[2]))
    assert bool(torch.isfinite(out).all())


def test_sign_flip_on_a_smoke_run() -> None:
    run = smoke_round("sign_flip")
    assert isinstance(run.sim.federation.attack.update, ATTACKS["sign_flip"])
    for row, k in enumerate(run.ids):
        flipped = 2 * run.global_state - run.trained[row]
        expected = flipped if k in run.attackers else run.trained[row]
        assert torch.allclose(run.received[row], expected, atol=1e-7), k
    assert not torch.allclose(run.new_global, run.clean_global, atol=1e-6)
