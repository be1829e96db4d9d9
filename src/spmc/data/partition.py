"""Dirichlet label-skew partition of the client pool (spec §1.2)."""

from __future__ import annotations

import logging
import math

import numpy as np

__all__ = ["dirichlet_partition"]

logger = logging.getLogger(__name__)

#: How many times the "repeat … until min size" loop may run before giving up.
MAX_TRIES = 1000


def _check_inputs(labels: np.ndarray, num_clients: int, beta: float, min_size: int, num_classes: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not (beta >= 0.0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] (num_classes={num_classes}), "
            f"got values in [{labels.min()}, {labels.max()}]"
        )
    if min_size * num_clients > labels.size:
        raise ValueError(
            f"cannot give each of num_clients={num_clients} clients min_size={min_size} samples "
            f"from a dataset of {labels.size}"
        )


def _proportions(rng: np.random.RandomState, sizes: list[int], n: int, beta: float) -> np.ndarray:
    """q ~ Dir(β·1_K), zeroed for clients already at ≥ n/K samples, renormalised (spec §1.2).

    β = 0 gives the equal split q = 1/K for every client (the repo's fallback) and draws nothing.
    """
    k = len(sizes)
    below_cap = np.array([s < n / k for s in sizes])
    if beta == 0.0:
        return np.full(k, 1.0 / k)
    q = rng.dirichlet(np.repeat(beta, k)) * below_cap
    total = q.sum()
    if not (math.isfinite(total) and total > 0.0):
        # Only for tiny β, where every uncapped draw underflows to 0 (or NaN): spread over the uncapped
        # clients.
        logger.debug("degenerate Dirichlet draw (beta=%g); using a uniform split over uncapped clients", beta)
        q = below_cap / max(int(below_cap.sum()), 1)
        return q.astype(np.float64)
    proportions: np.ndarray = q / total
    return proportions


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    beta: float,
    min_size: int = 10,
    seed: int = 0,
    num_classes: int | None = None,
) -> list[np.ndarray]:
    """Split positions 0 … len(labels) − 1 among ``num_clients`` clients, Dirichlet(β) label skew (spec §1.2).

    With N = len(labels), K = num_clients, C = num_classes (default max(labels) + 1)::

        repeat
            lists[j] = [] for j in 0..K-1
            for c in 0..C-1:
                I_c  = positions with label c, shuffled
                q    = Dirichlet([β]*K);  q_j = 0 where len(lists[j]) >= N/K;  q = q / sum(q)
                cuts = floor(cumsum(q) * len(I_c))[:-1];  split I_c at cuts, append piece j to lists[j]
        until min_j len(lists[j]) >= min_size
        shuffle each lists[j]

    All randomness comes from a local ``np.random.RandomState(seed)``, drawn in the same order as the
    reference code's global numpy RNG, so the result depends only on the arguments and global RNG state is
    untouched. β = 0 gives an equal split of every class. Returns one int64 array of positions into ``labels``
    per client; every position appears exactly once.

    As in the reference code, the cap is exact for clients 0 … K−2; the last client takes what the floor of
    the cuts leaves over: when its q is 0, cumsum(q) may end just below 1 and it still receives one sample.

    Raises:
        ValueError: invalid arguments, or ``min_size`` not reached after ``MAX_TRIES`` attempts.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (labels.size == 0 or np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} with shape {labels.shape}")
    n = int(labels.size)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if n else 1
    _check_inputs(labels, num_clients, float(beta), min_size, num_classes)

    rng = np.random.RandomState(seed)
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    attempt = 0
    while attempt < MAX_TRIES:
        attempt += 1
        lists: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = [0] * num_clients
        for idx_c in by_class:
            idx_c = idx_c.copy()
            rng.shuffle(idx_c)
            q = _proportions(rng, sizes, n, float(beta))
            cuts = (np.cumsum(q) * len(idx_c)).astype(np.int64)[:-1]
            for j, piece in enumerate(np.split(idx_c, cuts)):
                lists[j].append(piece)
                sizes[j] += len(piece)
        if min(sizes) >= min_size or beta == 0.0:  # β = 0 is deterministic in sizes: retrying cannot help
            break
    if min(sizes) < min_size:
        raise ValueError(
            f"dirichlet_partition could not give every one of num_clients={num_clients} clients at least "
            f"min_size={min_size} samples from a dataset of {n} (beta={beta}) in {attempt} tries; "
            "lower min_size or num_clients, or raise beta"
        )
    logger.debug("dirichlet_partition: %d attempt(s), client sizes %s", attempt, sizes)

    parts = [np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, np.int64) for pieces in lists]
    for part in parts:
        rng.shuffle(part)
    return parts
