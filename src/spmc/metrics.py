"""Reported metrics (spec §1.6): A, R = 100 − ASR and V = (A + R)/2 over the last k rounds; detection quality.

An untargeted attack (ATTACKS.md §A1: label flip, Byzantine updates with ``attack = none``) has no trigger, so its
runs report A only: R and V are None (``null`` in ``summary.json``). Its ΔA = A − A(no attack, same seed) needs a
second run and is computed by ``spmc table`` (:mod:`spmc.report.table`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class FinalMetrics:
    """A = mean clean accuracy, R = 100 − mean ASR, V = (A + R)/2 over the last ``last_k`` rounds (R and V None
    for an untargeted attack)."""

    A: float
    R: float | None
    V: float | None
    last_k: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def final_metrics(
    accuracies: Sequence[float], asrs: Sequence[float], last_k: int = 5, targeted: bool = True
) -> FinalMetrics:
    """A = mean(A_t), R = 100 − mean(ASR_t) over the last ``last_k`` rounds (fewer if the run is shorter);
    ``targeted`` False (an untargeted attack): R and V None."""
    if len(accuracies) != len(asrs):
        raise ValueError(f"got {len(accuracies)} accuracies and {len(asrs)} ASRs")
    if not accuracies:
        raise ValueError("no rounds to summarise")
    k = min(last_k, len(accuracies))
    a = sum(accuracies[-k:]) / k
    if not targeted:
        return FinalMetrics(A=a, R=None, V=None, last_k=k)
    r = 100.0 - sum(asrs[-k:]) / k
    return FinalMetrics(A=a, R=r, V=(a + r) / 2.0, last_k=k)


def detection_scores(
    accepted: Iterable[int], participants: Iterable[int], malicious: Iterable[int]
) -> dict[str, float]:
    """Precision and recall of the removed clients as a detector of the malicious ones (NaN where undefined)."""
    parts = set(participants)
    removed = parts - set(accepted)
    bad = parts & set(malicious)
    hits = len(removed & bad)
    precision = hits / len(removed) if removed else math.nan
    recall = hits / len(bad) if bad else math.nan
    return {"precision": precision, "recall": recall}
