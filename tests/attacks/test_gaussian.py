"""``gaussian`` (ATTACKS.md §A4): mean/std statistics on a large d, seeding by (seed, round, client id), options,
the update guard at the default σ and the effect on a run."""

from __future__ import annotations

import pytest
import torch

from spmc.attacks.gaussian import Gaussian, GaussianOptions
from spmc.guard import UpdateGuard, guard_states
from spmc.threat import ThreatModel

from ._crafting_helpers import make_inputs, smoke_round

D = 200_000


def test_noise_statistics_on_a_large_d() -> None:
    g = torch.linspace(-1, 1, D)
    out = Gaussian(options=GaussianOptions(0.5)).craft(make_inputs(torch.zeros(3, D), None, g, round_index=4))
    noise = (out - g).to(torch.float64)
    # per row: mean 0 ± 4·σ/√d, std σ ± 1 % (the std's standard error is σ/√(2d) ≈ 0.16 %)
    assert noise.mean(1).abs().max() < 4 * 0.5 / D**0.5
    assert torch.allclose(noise.std(1), torch.full((3,), 0.5, dtype=torch.float64), rtol=0.01)
    corr = torch.corrcoef(noise)  # the attackers' draws are independent
    assert corr.fill_diagonal_(0).abs().max() < 0.02
    fraction = float((noise.abs() < 0.5).to(torch.float64).mean())
    assert fraction == pytest.approx(0.6827, abs=0.005)  # P(|ξ| < σ) of a normal


def test_noise_is_seeded_by_seed_round_and_client() -> None:
    def draw(seed: int, t: int, ids: tuple[int, ...]) -> torch.Tensor:
        inputs = make_inputs(torch.zeros(len(ids), 50), None, torch.zeros(50), round_index=t, attacker_ids=ids)
        return Gaussian(threat=ThreatModel(seed=seed)).craft(inputs)

    first = draw(0, 1, (7, 9))
    assert torch.equal(first, draw(0, 1, (7, 9)))
    assert torch.equal(first[1], draw(0, 1, (9,))[0])  # independent of who else attacks this round
    assert not torch.equal(first, draw(0, 2, (7, 9))) and not torch.equal(first, draw(1, 1, (7, 9)))
    assert not torch.equal(first[0], first[1])


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_gaussian_std_is_validated(bad: float) -> None:
    with pytest.raises(ValueError, match=r"^gaussian_std: got .*; must be a finite number > 0$"):
        GaussianOptions(bad)


def test_the_update_guard_keeps_the_default_noise() -> None:
    run = smoke_round("gaussian")
    attacker = run.ids.index(run.attackers[0])
    noise = run.received[attacker] - run.global_state
    assert float(noise.std()) == pytest.approx(1.0, rel=0.02)  # the default σ, through the configuration
    mask = torch.ones(run.global_state.shape[0], dtype=torch.bool)
    assert guard_states(run.global_state, list(run.received), mask, UpdateGuard()) == [None] * len(run.ids)
    for row, k in enumerate(run.ids):
        if k not in run.attackers:
            assert torch.equal(run.received[row], run.trained[row])
    assert float((run.new_global - run.clean_global).abs().mean()) > 0.1  # FedAvg takes a quarter of the noise
