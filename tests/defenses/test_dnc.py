"""DnC (spec §6.2, D18): SVD scores by hand, r = ⌊c·⌊γn⌋⌋, outlier removal, combine modes, determinism, errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from spmc import make_experiment
from spmc.config import build_as
from spmc.defenses.base import round_generator
from spmc.defenses.dnc import DnC, DnCOptions, dnc_keep, dnc_outlier_scores, num_removed
from spmc.params import ParamLayout
from spmc.threat import ThreatModel

from ._helpers import BN, LINEAR, make_inputs

WIDE = ParamLayout.from_module(nn.Linear(40, 1))  # 41 parameters, for coordinate sub-sampling


def make_dnc(gamma: float, seed: int = 0, **options: Any) -> DnC:
    """DnC with γ (and the seed) of a threat model, the other options given."""
    return DnC(DnCOptions(**options), ThreatModel(gamma=gamma, seed=seed))


def benign_plus_outlier(n: int, layout: ParamLayout, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n − 1 updates along one common direction with small noise, the last one pointing the other way."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(layout.dim, generator=gen)
    direction = torch.randn(layout.dim, generator=gen)
    updates = direction + 0.05 * torch.randn(n, layout.dim, generator=gen)
    updates[-1] = -3.0 * direction
    return g, g + updates


def test_outlier_scores_hand_computed() -> None:
    # Rows t·(3, 4) for t = 0, 1, 2: centred rows −(3, 4), 0, (3, 4); v = ±(0.6, 0.8); σ = (⟨·, v⟩)² = 25, 0, 25.
    rows = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    assert dnc_outlier_scores(rows).tolist() == pytest.approx([25.0, 0.0, 25.0])
    # Rows e1, −e1, 0: the top direction is e1, σ = 1, 1, 0.
    rows = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])
    assert dnc_outlier_scores(rows).tolist() == pytest.approx([1.0, 1.0, 0.0])


def test_num_removed() -> None:
    assert num_removed(10, 0.2, 0.5) == 1
    assert num_removed(10, 0.3, 0.5) == 1
    assert num_removed(10, 0.3, 1.0) == 3  # ⌊0.3·10⌋ = 3 despite 0.3·10 = 2.9999999999999996
    assert num_removed(10, 0.0, 0.5) == 0
    assert num_removed(7, 0.3, 1.0) == 2


def test_dnc_removes_an_obvious_outlier_and_reports_it() -> None:
    g, states = benign_plus_outlier(5, BN)
    ids = (3, 9, 4, 1, 7)
    agg = make_dnc(gamma=0.4, filter_frac=0.5).aggregate(
        make_inputs(states, ids, global_state=g, layout=BN)
    )  # m̂ = 2, r = 1
    assert agg.diagnostics["removed"] == [7]
    assert agg.accepted == (3, 9, 4, 1)
    assert agg.weights is not None and agg.weights.tolist() == [0.25, 0.25, 0.25, 0.25, 0.0]
    assert torch.allclose(agg.global_state, states[:4].mean(dim=0), atol=1e-6)
    scores = agg.diagnostics["scores"]
    assert max(scores, key=scores.get) == "7"


def test_dnc_normalisation_hides_a_large_norm_in_the_common_direction() -> None:
    # Client 4 is 100× longer but benign in direction: normalised detection keeps it, raw detection drops it.
    gen = torch.Generator().manual_seed(1)
    direction = torch.randn(LINEAR.dim, generator=gen)
    updates = direction + 0.05 * torch.randn(5, LINEAR.dim, generator=gen)
    updates[4] *= 100
    inputs = make_inputs(updates)
    assert 4 in make_dnc(gamma=0.4, normalize=True).aggregate(inputs).accepted
    assert make_dnc(gamma=0.4, normalize=False).aggregate(inputs).diagnostics["removed"] == [4]


def test_dnc_keeps_everyone_when_r_is_zero() -> None:
    g, states = benign_plus_outlier(5, LINEAR)
    agg = make_dnc(gamma=0.2, filter_frac=0.5).aggregate(make_inputs(states, global_state=g))  # m̂ = 1, r = 0
    assert agg.accepted == (0, 1, 2, 3, 4) and agg.diagnostics["removed"] == []
    assert torch.allclose(agg.global_state, states.mean(dim=0), atol=1e-6)


def test_dnc_integer_counter_stays_out_of_the_detection() -> None:
    g, states = benign_plus_outlier(5, BN)
    states[0, -1] = g[-1] + 1000.0  # a huge counter step on a benign client
    inputs = make_inputs(states, global_state=g, layout=BN)
    assert make_dnc(gamma=0.4).aggregate(inputs).diagnostics["removed"] == [4]
    assert make_dnc(gamma=0.4, normalize=False, exclude_int_buffers=False).aggregate(inputs).diagnostics["removed"] == [
        0
    ]


def test_union_and_intersection_of_iterations() -> None:
    # One coordinate per iteration: client 0 is the outlier on coordinate 0, client 1 on coordinate 1.
    vectors = torch.tensor([[9.0, 0.0], [0.0, 9.0], [0.1, 0.2], [0.2, 0.1], [0.0, 0.0]])
    ids = tuple(range(5))
    union, scores = dnc_keep(vectors, ids, 1, round_generator(0, 0), subdim=1, niters=12, combine="union")
    inter, _ = dnc_keep(vectors, ids, 1, round_generator(0, 0), subdim=1, niters=12, combine="intersection")
    assert len(scores) == 12
    assert union == [0, 1, 2, 3, 4]
    assert inter == [2, 3, 4]
    one, _ = dnc_keep(vectors, ids, 1, round_generator(0, 0), subdim=2, niters=1)
    assert len(one) == 4


def test_subsampling_is_deterministic_per_round_and_order_free() -> None:
    g, states = benign_plus_outlier(6, WIDE, seed=3)
    ids = (5, 0, 2, 8, 1, 4)
    dnc = make_dnc(gamma=0.5, filter_frac=1.0, subdim=10)  # r = 3 of 6, 10 of 41 coordinates
    a = dnc.aggregate(make_inputs(states, ids, global_state=g, layout=WIDE, round_index=2))
    b = dnc.aggregate(make_inputs(states, ids, global_state=g, layout=WIDE, round_index=2))
    assert a.accepted == b.accepted and torch.equal(a.global_state, b.global_state)
    perm = [3, 5, 0, 1, 4, 2]
    c = dnc.aggregate(
        make_inputs(states[perm], tuple(ids[i] for i in perm), global_state=g, layout=WIDE, round_index=2)
    )
    assert set(c.accepted or ()) == set(a.accepted or ())
    assert torch.allclose(c.global_state, a.global_state, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 9), seed=st.integers(0, 10_000), gamma=st.sampled_from([0.2, 0.3, 0.5]))
def test_dnc_order_free_and_weights_sum_to_one(n: int, seed: int, gamma: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(WIDE.dim, generator=gen)
    states = g + torch.randn(n, WIDE.dim, generator=gen)
    ids = tuple(int(i) for i in torch.randperm(40, generator=gen)[:n])
    perm = torch.randperm(n, generator=gen)
    dnc = make_dnc(gamma=gamma, filter_frac=1.0, subdim=20, seed=seed)
    a = dnc.aggregate(make_inputs(states, ids, global_state=g, layout=WIDE))
    b = dnc.aggregate(make_inputs(states[perm], tuple(ids[i] for i in perm), global_state=g, layout=WIDE))
    assert set(a.accepted or ()) == set(b.accepted or ())
    assert len(a.accepted or ()) == n - num_removed(n, gamma, 1.0)
    assert torch.allclose(a.global_state, b.global_state, atol=1e-5)
    assert a.weights is not None and a.weights.sum().item() == pytest.approx(1.0) and bool((a.weights >= 0).all())


def test_dnc_errors_and_config() -> None:
    with pytest.raises(ValueError, match=r"dnc_filter_frac.*r = .*6 of n = 4"):
        make_dnc(gamma=0.5, filter_frac=3.0).aggregate(make_inputs(torch.randn(4, 3)))
    for kwargs, field in [
        ({"filter_frac": -1.0}, "dnc_filter_frac"),
        ({"niters": 0}, "dnc_niters"),
        ({"subdim": 0}, "dnc_subdim"),
        ({"combine": "both"}, "dnc_combine"),
    ]:
        with pytest.raises(ValueError, match=field):
            DnCOptions(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^gamma: got 1\.5; must be a fraction in \[0, 1\)$"):
        ThreatModel(gamma=1.5)
    cfg = make_experiment(gamma=0.2, seed=7, dnc_niters=3, dnc_combine="intersection", dnc_normalize=False)
    d = build_as("dnc", cfg)
    assert isinstance(d, DnC)
    o = d.options
    assert (d.gamma, o.filter_frac, o.niters, o.subdim, o.normalize, o.combine, d.seed) == (
        0.2,
        0.5,
        3,
        10_000,
        False,
        "intersection",
        7,
    )
