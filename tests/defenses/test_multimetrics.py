"""Multi-Metrics (ATTACKS.md §A6): hand-computed features and whitened scores, the outlier scores highest."""

from __future__ import annotations

import math

import pytest
import torch

from spmc.defenses.multimetrics import (
    MultiMetrics,
    MultiMetricsOptions,
    keep_count,
    metric_features,
    pairwise_l1_distances,
    whitened_scores,
)

from ._helpers import BN, make_inputs


def test_features_hand_computed() -> None:
    x = torch.tensor([[1.0, 0, 0], [0, 1, 0], [2, 0, 0]])
    f = metric_features(x)
    # cosine distances: 1–2 orthogonal (1), 1–3 parallel (0), 2–3 orthogonal (1)
    assert f[:, 0].tolist() == pytest.approx([1.0, 2.0, 1.0])
    # the rows are divided by the largest entry (2): L1 distances 2, 1, 3 → halves; L2 √2, 1, √5 → halves
    assert (2 * f[:, 1]).tolist() == pytest.approx([3.0, 5.0, 4.0])
    r2, r5 = math.sqrt(2), math.sqrt(5)
    assert (2 * f[:, 2]).tolist() == pytest.approx([1 + r2, r2 + r5, 1 + r5])
    assert pairwise_l1_distances(x, block=2).tolist() == [[0, 2, 1], [2, 0, 3], [1, 3, 0]]


def test_whitened_scores_hand_computed() -> None:
    # mean 0, covariance (divisor n − 1 = 3) diag(2/3, 2/3): x Σ⁻¹ x = 1.5 for every row
    x = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]], dtype=torch.float64)
    assert whitened_scores(x).tolist() == pytest.approx([math.sqrt(1.5)] * 4)
    # singular covariance [[1, 0], [0, 0]]: the pseudo-inverse keeps the first feature only
    assert whitened_scores(torch.tensor([[1.0, 5], [2, 5], [3, 5]])).tolist() == pytest.approx([1.0, 2.0, 3.0])
    assert whitened_scores(torch.tensor([[4.0, 1.0, 2.0]])).tolist() == [0.0]


def test_outlier_in_3d_features_gets_the_highest_score() -> None:
    # c ± 0.5 e_i (six benign clients) and the outlier 2c, c = (1, 1, 1): Σ = ccᵀ/7 + I/12, and by
    # Sherman–Morrison (2c)ᵀ Σ⁻¹ (2c) = 12 (12 − (36/7)/(43/84)) = 1008/43
    c = torch.ones(3, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    x = torch.stack([c + s * 0.5 * eye[i] for i in range(3) for s in (1, -1)] + [2 * c])
    scores = whitened_scores(x)
    assert int(scores.argmax()) == 6
    assert float(scores[6]) == pytest.approx(math.sqrt(1008 / 43))


def test_far_outlier_update_is_dropped_with_centred_scores_not_always_without() -> None:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(BN.dim, generator=gen)
    direction = torch.randn(BN.dim, generator=gen)
    updates = direction + 0.1 * torch.randn(10, BN.dim, generator=gen)
    updates[7] = -3 * direction  # far away, opposite
    ids = tuple(range(30, 40))
    inputs = make_inputs(g + updates, ids, layout=BN, global_state=g)
    agg = MultiMetrics(MultiMetricsOptions(center=True)).aggregate(inputs)
    scores = agg.diagnostics["scores"]
    assert max(scores, key=scores.get) == "37"
    assert agg.accepted is not None and len(agg.accepted) == 3 and 37 not in agg.accepted
    kept = [i - 30 for i in agg.accepted]
    assert torch.allclose(agg.global_state, (g + updates[kept]).mean(dim=0), atol=1e-6)
    assert sorted(scores.values())[:3] == pytest.approx(sorted(scores[str(k)] for k in agg.accepted))
    # the paper's uncentred score: the outlier inflates Σ along its own direction and does not score highest here
    paper = MultiMetrics().aggregate(inputs).diagnostics["scores"]
    assert max(paper, key=paper.get) != "37"


def test_keep_fraction_and_options() -> None:
    assert [keep_count(n, 0.3) for n in (1, 3, 4, 10, 11)] == [1, 1, 1, 3, 3]
    assert keep_count(10, 1.0) == 10
    for bad in (0.0, -0.2, 1.5, math.nan):
        with pytest.raises(ValueError, match="multimetrics_keep"):
            MultiMetricsOptions(keep=bad)
    agg = MultiMetrics(MultiMetricsOptions(keep=1.0)).aggregate(make_inputs(torch.randn(4, 3)))
    assert agg.accepted == (0, 1, 2, 3)
