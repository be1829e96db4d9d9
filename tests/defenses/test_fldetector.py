"""FLDetector (ATTACKS.md §A6): L-BFGS on a quadratic, an inconsistent client flagged, checkpoint roundtrip, partial
participation and unseen clients."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from spmc.config import build_defense, make_experiment
from spmc.defenses.base import Aggregate
from spmc.defenses.fldetector import (
    FLDetector,
    FLDetectorOptions,
    _warn_too_short,
    first_active_round,
    gap_statistic,
    kmeans_1d_inertias,
    lbfgs_hvp,
    normalised_distances,
)
from spmc.params import ParamLayout
from spmc.threat import ThreatModel

from ._helpers import make_inputs

LAYOUT = ParamLayout.from_module(nn.Linear(11, 1))  # 12 parameters
D = LAYOUT.dim
GEN = torch.Generator().manual_seed(0)
Q = torch.linalg.qr(torch.randn(D, D, generator=GEN, dtype=torch.float64)).Q
A = Q @ torch.diag(torch.linspace(0.5, 2.0, D, dtype=torch.float64)) @ Q.T  # SPD Hessian
OPTIMA = 0.3 * torch.randn(20, D, generator=GEN, dtype=torch.float64)  # client k's optimum


def honest(k: int, theta: torch.Tensor) -> torch.Tensor:
    """One gradient step on ½(θ − θ*_k)ᵀA(θ − θ*_k): u = −0.1·A(θ − θ*_k), linear in θ."""
    return -0.1 * A @ (theta - OPTIMA[k])


def play(defense: FLDetector, rounds: range, theta: torch.Tensor, ids: list[int], bad: int | None) -> list[Aggregate]:
    """Rounds of honest clients (and a client ``bad`` sending a fresh random update of the same size each round);
    returns the aggregates and advances ``theta`` in place."""
    out = []
    for t in rounds:
        rng = torch.Generator().manual_seed(100 + t)
        ups = []
        for k in ids:
            u = honest(k, theta)
            if k == bad:
                u = torch.randn(D, generator=rng, dtype=torch.float64) * float(u.norm()) / D**0.5
            ups.append(u)
        agg = defense.aggregate(
            make_inputs(theta + torch.stack(ups), tuple(ids), global_state=theta.clone(), layout=LAYOUT, round_index=t)
        )
        theta.copy_(agg.global_state)
        out.append(agg)
    return out


def test_lbfgs_compact_form_equals_the_recursive_bfgs_update() -> None:
    s = torch.randn(4, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = s @ A  # y_j = A s_j (a quadratic)
    v = torch.randn(3, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigma = float(y[-1] @ s[-1] / (s[-1] @ s[-1]))
    b = sigma * torch.eye(D, dtype=torch.float64)
    for sj, yj in zip(s, y):  # B ← B − B s sᵀ B / sᵀ B s + y yᵀ / yᵀ s
        bs = b @ sj
        b = b - torch.outer(bs, bs) / (sj @ bs) + torch.outer(yj, yj) / (yj @ sj)
    hv = lbfgs_hvp(s, y, v)
    assert torch.allclose(hv, v @ b.T, atol=1e-8)
    assert torch.allclose(lbfgs_hvp(s, y, s[-1:]), y[-1:], atol=1e-8)  # the secant condition B s_p = y_p
    assert torch.equal(lbfgs_hvp(torch.zeros(2, D), torch.ones(2, D), v), torch.zeros_like(v))  # no usable pair


def test_normalised_distances_and_gap_statistic() -> None:
    assert normalised_distances(torch.tensor([1.0, 3.0])).tolist() == pytest.approx([0.5, 1.5])
    assert normalised_distances(torch.tensor([0.0, 0.0])).tolist() == [0.0, 0.0]
    assert normalised_distances(torch.tensor([float("inf"), 1.0])).tolist() == [2.0, 0.0]
    assert gap_statistic([1.0] * 6, seed=0) == 1
    # exact 1-D k-means: one cluster 245 − 4·5.75² = 112.75; {0, 1} | {10, 12}: 0.5 + 2
    assert kmeans_1d_inertias(np.array([12.0, 0.0, 10.0, 1.0]), 4) == pytest.approx([112.75, 2.5, 0.5, 0.0])
    assert gap_statistic([0.1, 0.11, 0.12, 0.1, 0.09, 0.1, 0.11, 5.0, 5.1], seed=0) >= 2


def test_inconsistent_client_is_flagged_and_dropped() -> None:
    fld = FLDetector(FLDetectorOptions(window=3), ThreatModel(seed=1))
    ids = list(range(8))
    aggs = play(fld, range(8), torch.zeros(D, dtype=torch.float64), ids, bad=5)
    assert not aggs[2].diagnostics["detection_active"]  # warm-up: the window holds fewer than N pairs
    last = aggs[-1].diagnostics
    assert last["detection_active"]
    assert max(last["scores"], key=last["scores"].get) == "5"
    assert last["flagged"] == [5] and aggs[-1].accepted == (0, 1, 2, 3, 4, 6, 7)
    assert last["banned"] == []  # dropped in the round only (default)


def test_ban_keeps_a_flagged_client_out() -> None:
    fld = FLDetector(FLDetectorOptions(window=3, ban=True))
    theta = torch.zeros(D, dtype=torch.float64)
    aggs = play(fld, range(7), theta, list(range(8)), bad=5)
    assert aggs[-1].diagnostics["banned"] == [5]
    after = play(fld, range(7, 8), theta, list(range(8)), bad=None)  # client 5 behaves now, still out
    assert 5 not in (after[0].accepted or ())


def test_state_dict_roundtrip_gives_identical_next_round() -> None:
    fld = FLDetector(FLDetectorOptions(window=3), ThreatModel(seed=2))
    theta = torch.zeros(D, dtype=torch.float64)
    play(fld, range(6), theta, list(range(8)), bad=5)
    state = fld.state_dict()
    fresh = FLDetector(FLDetectorOptions(window=3), ThreatModel(seed=2))
    fresh.load_state_dict({str(k): v for k, v in state.items()})  # string ids, as JSON-like stores write them
    a = play(fld, range(6, 7), theta.clone(), list(range(8)), bad=5)[0]
    b = play(fresh, range(6, 7), theta.clone(), list(range(8)), bad=5)[0]
    assert torch.equal(a.global_state, b.global_state)
    assert a.diagnostics == b.diagnostics and a.diagnostics["flagged"] == [5]
    with pytest.raises(ValueError, match="fldetector"):
        FLDetector(FLDetectorOptions(window=4)).load_state_dict(state)
    with pytest.raises(ValueError, match="fldetector"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != -1})


def test_partial_participation_and_unseen_clients() -> None:
    fld = FLDetector(FLDetectorOptions(window=3))
    theta = torch.zeros(D, dtype=torch.float64)
    play(fld, range(3), theta, [0, 1, 2, 3], bad=None)
    play(fld, range(3, 4), theta, [0, 1, 4], bad=None)  # 2, 3 skip; 4 is new
    agg = play(fld, range(4, 5), theta, [0, 2, 4, 9], bad=None)[0]  # 2 returns after a skipped round; 9 is new
    dist = agg.diagnostics["distances"]
    assert set(dist) == {"0", "2", "4"}  # 9 was never seen: no prediction, and it is kept
    assert 9 in (agg.accepted or ())


def test_options_are_checked() -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="fldetector_window"):
            FLDetectorOptions(window=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rounds"):
        FLDetectorOptions(rounds=0)


@pytest.mark.parametrize("window", [1, 3, 5])
def test_detection_acts_from_round_window_plus_one(window: int) -> None:
    """The first active round is ``first_active_round(N)`` = N + 1, so a run needs N + 2 rounds for detection to
    act once."""
    fld = FLDetector(FLDetectorOptions(window=window, rounds=window + 2))
    aggs = play(fld, range(window + 2), torch.zeros(D, dtype=torch.float64), list(range(6)), bad=None)
    active = [t for t, a in enumerate(aggs) if a.diagnostics["detection_active"]]
    assert active == [first_active_round(window)] == [window + 1]


def test_a_run_too_short_for_the_window_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """matrix-fmnist's 10 rounds with the paper's window 10: FLDetector would silently be FedAvg. Said once per
    process and setting (a run builds its defense twice: to check the configuration, then to run)."""
    _warn_too_short.cache_clear()
    with caplog.at_level(logging.WARNING, logger="spmc.defenses.fldetector"):
        FLDetector(FLDetectorOptions(window=10, rounds=11))
        FLDetector(FLDetectorOptions(window=10, rounds=11))
    assert "fldetector_window = 10" in caplog.text and "11 rounds" in caplog.text and "<= 9" in caplog.text
    assert len(caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spmc.defenses.fldetector"):
        FLDetector(FLDetectorOptions(window=10, rounds=12))
        build_defense(make_experiment(defense="fldetector", rounds=12))
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="spmc.defenses.fldetector"):
        build_defense(make_experiment(defense="fldetector", rounds=10))
    assert "the run has 10 rounds" in caplog.text
    with caplog.at_level(logging.WARNING, logger="spmc.defenses.fldetector"):
        FLDetector(FLDetectorOptions(window=1, rounds=2))
    assert "no window can act in fewer than 3 rounds" in caplog.text
