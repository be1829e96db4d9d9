"""Reported metrics (spec §1.6): A, R, V over the last k rounds and the detection precision/recall."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spmc.metrics import FinalMetrics, detection_scores, final_metrics

percent = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)


def test_final_metrics_average_the_last_k_rounds() -> None:
    # rounds 3..5: A = (70 + 80 + 90)/3 = 80, ASR = (40 + 20 + 0)/3 = 20 → R = 80, V = 80
    m = final_metrics([10.0, 20.0, 70.0, 80.0, 90.0], [90.0, 80.0, 40.0, 20.0, 0.0], last_k=3)
    assert m == FinalMetrics(A=80.0, R=80.0, V=80.0, last_k=3)


def test_final_metrics_weighs_accuracy_and_robustness_equally() -> None:
    # A = (60 + 62)/2 = 61, ASR = (30 + 34)/2 = 32 → R = 68, V = (61 + 68)/2 = 64.5
    m = final_metrics([50.0, 60.0, 62.0], [99.0, 30.0, 34.0], last_k=2)
    assert (m.A, m.R, m.V, m.last_k) == (pytest.approx(61.0), pytest.approx(68.0), pytest.approx(64.5), 2)
    assert m.as_dict() == {"A": m.A, "R": m.R, "V": m.V, "last_k": 2}


def test_a_run_shorter_than_k_uses_every_round() -> None:
    m = final_metrics([40.0, 60.0], [10.0, 30.0], last_k=5)
    assert (m.A, m.R, m.last_k) == (50.0, 80.0, 2)


@pytest.mark.parametrize(
    ("accuracies", "asrs", "match"),
    [([1.0, 2.0], [1.0], "2 accuracies and 1 ASRs"), ([], [], "no rounds")],
)
def test_final_metrics_refuses_mismatched_or_empty_series(
    accuracies: list[float], asrs: list[float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        final_metrics(accuracies, asrs)


@given(
    st.lists(st.tuples(percent, percent), min_size=1, max_size=30),
    st.integers(min_value=1, max_value=40),
)
def test_final_metrics_properties(rounds: list[tuple[float, float]], last_k: int) -> None:
    accuracies = [a for a, _ in rounds]
    asrs = [r for _, r in rounds]
    m = final_metrics(accuracies, asrs, last_k)
    k = min(last_k, len(rounds))
    assert m.last_k == k
    assert math.isclose(m.V, (m.A + m.R) / 2, abs_tol=1e-9)
    assert min(accuracies[-k:]) - 1e-9 <= m.A <= max(accuracies[-k:]) + 1e-9
    assert 100 - max(asrs[-k:]) - 1e-9 <= m.R <= 100 - min(asrs[-k:]) + 1e-9
    # rounds before the last k do not count
    shifted = final_metrics([0.0] * 3 + accuracies, [100.0] * 3 + asrs, k)
    assert math.isclose(shifted.A, m.A, abs_tol=1e-9) and math.isclose(shifted.R, m.R, abs_tol=1e-9)


def test_detection_scores_hand_computed() -> None:
    # participants 0..5, malicious {4, 5}, accepted {0, 1, 2, 5}: removed {3, 4}, one of them malicious
    scores = detection_scores(accepted=[0, 1, 2, 5], participants=range(6), malicious=[4, 5])
    assert scores == {"precision": 0.5, "recall": 0.5}


def test_detection_scores_perfect_detector() -> None:
    assert detection_scores([0, 1, 2], [0, 1, 2, 3, 4], [3, 4]) == {"precision": 1.0, "recall": 1.0}


def test_detection_scores_only_count_participants() -> None:
    # malicious 9 did not take part: recall is over {4} only; the absent id 7 in `accepted` changes nothing
    assert detection_scores([0, 1, 7], [0, 1, 4], [4, 9]) == {"precision": 1.0, "recall": 1.0}


def test_detection_scores_are_nan_where_undefined() -> None:
    nothing_removed = detection_scores([0, 1, 2], [0, 1, 2], [2])
    assert math.isnan(nothing_removed["precision"]) and nothing_removed["recall"] == 0.0
    no_attacker = detection_scores([0], [0, 1], [])
    assert no_attacker["precision"] == 0.0 and math.isnan(no_attacker["recall"])


@given(
    st.sets(st.integers(0, 20), min_size=1),
    st.data(),
)
def test_detection_scores_properties(participants: set[int], data: st.DataObject) -> None:
    members = sorted(participants)
    accepted = data.draw(st.sets(st.sampled_from(members)))
    malicious = data.draw(st.sets(st.sampled_from(members)))
    scores = detection_scores(accepted, participants, malicious)
    removed, bad = participants - accepted, malicious
    hits = len(removed & bad)
    for key, denominator in (("precision", len(removed)), ("recall", len(bad))):
        if denominator == 0:
            assert math.isnan(scores[key])
        else:
            assert scores[key] == pytest.approx(hits / denominator)
            assert 0.0 <= scores[key] <= 1.0
    if removed == bad and bad:
        assert scores == {"precision": 1.0, "recall": 1.0}
