"""``blended`` (ATTACKS.md §A3): x' = (1 − a)·x + a·P in pixel space, on normalised batches."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc.attacks import ATTACKS, AttackSettings
from spmc.attacks.blended import Blended, BlendedOptions, blend, noise_pattern
from spmc.threat import ThreatModel

from ._helpers import asr_on, run

MEAN, STD = (0.5, 0.25, 0.0), (0.25, 0.5, 1.0)


def test_blend_formula_on_a_2x2_image_by_hand() -> None:
    # pixel image x (channel 0) = [[0, 1], [0.5, 0.25]], P = [[1, 0], [0.5, 0.75]], a = 0.2, μ = 0.5, σ = 0.25
    # x' = 0.8·x + 0.2·P = [[0.2, 0.8], [0.5, 0.35]]; normalised: (x' − 0.5)/0.25 = [[-1.2, 1.2], [0, -0.6]]
    pixel = torch.tensor([[0.0, 1.0], [0.5, 0.25]])
    x = ((pixel - 0.5) / 0.25).expand(1, 1, 2, 2)
    p = torch.tensor([[[1.0, 0.0], [0.5, 0.75]]])
    out = blend(x, p, 0.2, (0.5,), (0.25,))
    torch.testing.assert_close(out[0, 0], torch.tensor([[-1.2, 1.2], [0.0, -0.6]]))


def test_poison_blends_masked_rows_with_the_seeded_pattern_and_relabels() -> None:
    attack = Blended(AttackSettings(target=2, mean=MEAN, std=STD), BlendedOptions(alpha=0.2, seed=3))
    pixel = torch.rand(3, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    mu, sigma = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    x = (pixel - mu) / sigma
    mask = torch.tensor([True, False, True])
    xb, yb = attack.poison(x.clone(), torch.tensor([0, 1, 5]), mask)
    p = torch.rand((3, 2, 2), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(attack.pattern((3, 2, 2)), p)
    expected = ((0.8 * pixel + 0.2 * p) - mu) / sigma
    torch.testing.assert_close(xb[mask], expected[mask])
    assert torch.equal(xb[1], x[1]) and yb.tolist() == [2, 1, 2]


def test_test_set_blends_every_image_and_keeps_the_input() -> None:
    attack = ATTACKS["blended"](AttackSettings(target=1), None, ThreatModel())
    x, y = torch.zeros(4, 3, 2, 2), torch.tensor([0, 1, 2, 3])
    xb, yb, not_target = attack.test_set(x, y)
    torch.testing.assert_close(xb, 0.2 * noise_pattern((3, 2, 2), 0).expand(4, 3, 2, 2))
    assert torch.equal(x, torch.zeros(4, 3, 2, 2)) and yb.tolist() == [1] * 4
    assert not_target.tolist() == [True, False, True, True]


@settings(max_examples=25, deadline=None)
@given(st.floats(0.01, 1.0), st.floats(0.0, 1.0))
def test_blend_stays_in_pixel_range(alpha: float, value: float) -> None:
    x = torch.full((1, 3, 2, 2), value)  # identity normalisation: pixel = normalised
    out = blend(x, noise_pattern((3, 2, 2), 0), alpha, (0.0,), (1.0,))
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"alpha": 0.0}, "blend_alpha: got 0.0"), ({"alpha": 1.5}, "blend_alpha"), ({"seed": -1}, "blend_seed: got -1")],
)
def test_options_are_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BlendedOptions(**kwargs)


def test_a_run_learns_the_blend_trigger() -> None:
    attacked, _ = run("blended")
    clean, _ = run("none")
    assert asr_on(attacked, attacked) > asr_on(clean, attacked) + 20.0
