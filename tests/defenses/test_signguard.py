"""SignGuard (Xu et al., ICDCS 2022; ATTACKS.md §A6): the norm band by hand, sign-flipping attackers dropped by the
sign clustering, the clipped mean of the kept clients, seeded coordinates, order independence."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from spmc import make_experiment
from spmc.config import build_defense
from spmc.defenses.base import round_generator
from spmc.defenses.norm_clip import clip_factors
from spmc.defenses.signguard import (
    SignGuard,
    SignGuardOptions,
    coordinate_subset,
    largest_meanshift_cluster,
    norm_band,
    sign_features,
)
from spmc.params import ParamLayout
from spmc.threat import ThreatModel

from ._helpers import make_inputs

WIDE = ParamLayout.from_module(nn.Linear(50, 20))  # 1,020 parameters


def _honest_and_flipped(seed: int, n: int = 10, flipped: int = 3) -> torch.Tensor:
    """n updates around one direction whose coordinates are 80 % positive; the last ``flipped`` negated."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(WIDE.dim, generator=g).abs() * torch.where(torch.rand(WIDE.dim, generator=g) < 0.8, 1.0, -1.0)
    updates = torch.stack([base + 0.3 * torch.randn(WIDE.dim, generator=g) for _ in range(n)])
    updates[n - flipped :] = -updates[n - flipped :]
    return updates


def test_norm_band_by_hand() -> None:
    # median of the norms is (1 + 1) / 2 = 1: keep 0.1 ≤ norm ≤ 3.0, bounds included
    norms = torch.tensor([0.1, 1.0, 1.0, 3.0, 3.01, 0.0999], dtype=torch.float64)
    assert norm_band(norms, 0.1, 3.0).tolist() == [True, True, True, True, False, False]
    assert norm_band(norms, 0.5, 2.0).tolist() == [False, True, True, False, False, False]


def test_norm_band_drops_tiny_and_huge_updates() -> None:
    g = torch.Generator().manual_seed(0)
    updates = torch.randn(7, WIDE.dim, generator=g)
    updates /= updates.norm(dim=1, keepdim=True)  # unit norms, so the median is 1
    updates[2] *= 0.05  # below 0.1 · median
    updates[5] *= 3.5  # above 3 · median
    agg = SignGuard().aggregate(make_inputs(updates, layout=WIDE))
    assert agg.diagnostics["norm_band_removed"] == [2, 5]
    assert agg.accepted is not None and 2 not in agg.accepted and 5 not in agg.accepted


def test_sign_features_by_hand() -> None:
    values = torch.tensor([[1.0, -1.0, 0.0, 2.0], [-1.0, -1.0, -3.0, 0.0]])
    # shares (+, 0, −): (2/4, 1/4, 1/4) and (0, 1/4, 3/4); columns divided by their maxima (1/2, 1/4, 3/4)
    expected = torch.tensor([[1.0, 1.0, 1 / 3], [0.0, 1.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(sign_features(values), expected, atol=1e-6)


def test_flipped_sign_attackers_are_dropped() -> None:
    for seed in range(3):
        updates = _honest_and_flipped(seed)
        agg = SignGuard().aggregate(make_inputs(updates, layout=WIDE))
        assert agg.diagnostics["norm_band_removed"] == []  # same norms: only the signs give them away
        assert agg.diagnostics["sign_cluster_removed"] == [7, 8, 9]
        assert agg.accepted == tuple(range(7))


def test_result_is_the_mean_of_the_kept_updates_clipped_to_the_median_norm() -> None:
    updates = _honest_and_flipped(1).to(torch.float64)
    agg = SignGuard().aggregate(make_inputs(updates, layout=WIDE))
    norms = updates.norm(dim=1)
    med = float(norms.sort().values[4:6].mean())  # the median over all ten clients
    expected = (updates[:7] * clip_factors(norms[:7], med).unsqueeze(1)).mean(0)
    assert torch.allclose(agg.global_state, expected, atol=1e-12)
    assert agg.diagnostics["clip_norm"] == pytest.approx(med)
    assert agg.weights is not None and agg.weights.tolist() == pytest.approx([1 / 7] * 7 + [0.0] * 3)


def test_identical_sign_features_keep_everyone() -> None:
    updates = torch.ones(4, WIDE.dim) * torch.tensor([[1.0], [2.0], [1.5], [1.2]])
    keep, bandwidth = largest_meanshift_cluster(sign_features(updates))
    assert bandwidth == 0.0 and keep.tolist() == [True] * 4
    assert SignGuard().aggregate(make_inputs(updates, layout=WIDE)).accepted == (0, 1, 2, 3)


def test_coordinates_are_seeded_by_seed_and_round() -> None:
    a = coordinate_subset(1000, 0.1, round_generator(0, 3))
    assert a.numel() == 100 and torch.equal(a, a.unique())
    assert torch.equal(a, coordinate_subset(1000, 0.1, round_generator(0, 3)))
    assert not torch.equal(a, coordinate_subset(1000, 0.1, round_generator(0, 4)))
    assert not torch.equal(a, coordinate_subset(1000, 0.1, round_generator(1, 3)))
    assert coordinate_subset(5, 0.01, round_generator(0, 0)).numel() == 1


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 1000), data=st.data())
def test_client_order_changes_nothing(seed: int, data: st.DataObject) -> None:
    n = 12
    updates = _honest_and_flipped(seed, n=n, flipped=4)
    updates[:6] += 2.0 * torch.randn(6, WIDE.dim, generator=torch.Generator().manual_seed(seed))
    ids = tuple(range(100, 100 + n))
    perm = data.draw(st.permutations(list(range(n))))
    defense = SignGuard(threat=ThreatModel(seed=seed))
    a = defense.aggregate(make_inputs(updates, ids, layout=WIDE, round_index=seed))
    b = defense.aggregate(make_inputs(updates[perm], tuple(ids[i] for i in perm), layout=WIDE, round_index=seed))
    assert a.accepted is not None and b.accepted is not None
    assert sorted(a.accepted) == sorted(b.accepted)
    assert torch.allclose(a.global_state, b.global_state, atol=1e-6)


def test_options_and_config() -> None:
    for kwargs, key in [
        ({"lower": -0.1}, "signguard_lower"),
        ({"upper": 0.05}, "signguard_upper"),
        ({"upper": float("inf")}, "signguard_upper"),
        ({"coord_frac": 0.0}, "signguard_coord_frac"),
        ({"coord_frac": 1.5}, "signguard_coord_frac"),
    ]:
        with pytest.raises(ValueError, match=key):
            SignGuardOptions(**kwargs)
    defense = build_defense(make_experiment(defense="signguard", signguard_upper=2.0, signguard_coord_frac=0.5))
    assert isinstance(defense, SignGuard)
    assert (defense.options.upper, defense.options.coord_frac) == (2.0, 0.5)
