"""FLDetector (Zhang, Cao, Jia, Gong, "FLDetector: Defending Federated Learning Against Model Poisoning Attacks via
Detecting Malicious Clients", KDD 2022; ATTACKS.md §A6).

The server predicts each client's update from its previous one with an L-BFGS estimate of the Hessian and flags the
clients whose updates keep disagreeing with the prediction. On the float entries (integer counters left out, D31),
with θ_t the global state of round t, u_{k,t} = θ_{k,t} − θ_t and ū_t the aggregate update of round t:

    window   s_j = θ_j − θ_{j−1},  y_j = ū_j − ū_{j−1}   over the last N = ``fldetector_window`` (10) rounds
    L-BFGS   H v = σ v − [σS Y] M⁻¹ [σSᵀv; Yᵀv],  σ = y_pᵀs_p / s_pᵀs_p,  M = [[σSᵀS, L], [Lᵀ, −D]]
             (the compact form of Byrd, Nocedal & Schnabel 1994 as in the paper's Alg. 1; L the strictly lower part
             and D the diagonal of SᵀY; M⁻¹ a pseudo-inverse)
    predict  û_{k,t} = u_{k,r} + H (θ_t − θ_r)          r = the last round client k took part in
    distance d_{k,t} = ‖û_{k,t} − u_{k,t}‖₂,  normalised d_{k,t} · n_t / Σ_j d_{j,t} (mean 1 over the round)
    score    s_k = mean of client k's last N normalised distances
    act      when the gap statistic (Tibshirani et al. 2001; B = 20 uniform reference sets, K_max = 10, on the
             min–max normalised scores) finds more than one cluster: KMeans(k = 2) on the scores and the cluster
             with the higher mean score is dropped
    θ_{t+1} = the mean of the kept clients' states (the whole state)

Choices where the paper leaves room:

* Updates, not gradients. The paper works with gradients g; a client's update is −(learning rate) times a sum of
  gradients, and the compact L-BFGS form is odd in (Y, σ) (B(S, −Y) = −B(S, Y)), so running it on the updates
  predicts the updates directly.
* Partial participation: a client is predicted from its own last update u_{k,r} and the global states θ_r, θ_t,
  whenever round r is still in the server's window of N + 1 global states; a client never seen, or seen too long
  ago, gets no distance this round (it is judged on the scores it has, and kept when it has none). The
  normalisation to mean 1 (the paper divides by the sum) keeps rounds with different numbers of clients alike.
* Warm-up: scores are computed as soon as one (s, y) pair exists; detection acts only once the window holds N
  pairs (the paper starts after its window is full).
* Drop in the round (default) or ban for the rest of training (``fldetector_ban = true``). The paper stops
  training and restarts without the detected clients; a simulation cannot restart, and a false positive would
  be permanent, so the default drops the flagged clients in the round they are flagged. With banning, banned ids
  are kept in the state and never aggregated again.
* Randomness (gap-statistic reference sets, KMeans initialisation) is seeded by the experiment seed and the round;
  the scores are ordered by client id before clustering, so the client order changes nothing.

State (checkpointed with :meth:`FLDetector.state_dict`), keyed by client id: each client's last update; the window
of global states and aggregate updates with their rounds, and a table (id, last round, banned, scores) under the
negative keys −1 … −4.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from spmc.defenses._options import check_int
from spmc.defenses.base import Aggregate, RoundInputs, as_weight_list, finite_global, stat_mask, weighted_average
from spmc.options import option
from spmc.threat import ThreatModel

log = logging.getLogger(__name__)

GLOBALS, AGGREGATES, ROUNDS, TABLE = -1, -2, -3, -4


def lbfgs_hvp(s: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """H v for every row v of ``v`` [c, m], H the compact L-BFGS matrix of the pairs (rows of ``s``, ``y`` [p, m],
    oldest first); float64 [c, m]. Pairs with s = 0 are skipped; no usable pair gives H v = 0."""
    s, y, v = s.to(torch.float64), y.to(torch.float64), v.to(torch.float64)
    keep = (s * s).sum(dim=1) > 0
    s, y = s[keep], y[keep]
    p = s.shape[0]
    if p == 0 or v.shape[0] == 0:
        return torch.zeros_like(v)
    sigma = float(y[-1] @ s[-1]) / float(s[-1] @ s[-1])
    sts = s @ s.T
    sty = s @ y.T  # entries s_i · y_j
    lower = torch.tril(sty, diagonal=-1)
    diag = torch.diag(torch.diagonal(sty))
    mat = torch.cat([torch.cat([sigma * sts, lower], dim=1), torch.cat([lower.T, -diag], dim=1)], dim=0)
    rhs = torch.cat([sigma * (s @ v.T), y @ v.T], dim=0)  # [2p, c]
    sol = torch.linalg.pinv(mat) @ rhs
    out: torch.Tensor = sigma * v - (sigma * (sol[:p].T @ s) + sol[p:].T @ y)
    if not bool(torch.isfinite(out).all()):
        log.info("fldetector: the L-BFGS estimate is not finite; predicting no change")
        return torch.zeros_like(v)
    return out


def normalised_distances(dist: torch.Tensor) -> torch.Tensor:
    """d_k · n / Σ_j d_j (mean 1), float64 [n]; all zeros stay zeros; infinite distances share the mass."""
    d = dist.to(torch.float64)
    if not bool(torch.isfinite(d).all()):
        d = (~torch.isfinite(d)).to(torch.float64)
    total = float(d.sum())
    if d.numel() == 0 or total <= 0 or not math.isfinite(total):
        return torch.zeros_like(d)
    top = float(d.max())
    scaled: torch.Tensor = d / top
    return scaled * (d.numel() / float(scaled.sum()))


def kmeans_1d_inertias(values: np.ndarray, k_max: int) -> list[float]:
    """The optimal k-means inertia (within-cluster sum of squares) of the 1-D ``values`` for k = 1 … k_max, exact
    (clusters of sorted 1-D data are intervals; dynamic programming over the split points, O(k_max · n²))."""
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    n = x.shape[0]
    c1 = np.concatenate([[0.0], np.cumsum(x)])
    c2 = np.concatenate([[0.0], np.cumsum(x * x)])
    lo, hi = np.triu_indices(n + 1, k=1)  # the interval x[lo:hi]
    sse = np.full((n + 1, n + 1), np.inf)
    sse[lo, hi] = np.maximum(c2[hi] - c2[lo] - (c1[hi] - c1[lo]) ** 2 / (hi - lo), 0.0)
    best = sse[0].copy()  # best[i]: the first i values in one cluster
    out = [float(best[n])]
    for _ in range(2, min(k_max, n) + 1):
        best = np.min(best[:, None] + sse, axis=0)
        out.append(float(best[n]))
    return out


def gap_statistic(scores: Sequence[float], seed: int, references: int = 20, k_max: int = 10) -> int:
    """The number of clusters the gap statistic picks for the 1-D ``scores`` (min–max normalised): the smallest k
    with Gap(k) ≥ Gap(k+1) − s_{k+1} (Tibshirani, Walther & Hastie 2001), k ≤ min(k_max, distinct values);
    Gap(k) = mean_b ln W*_kb − ln W_k, W the k-means inertia, the references uniform on [0, 1]."""
    x = np.asarray(scores, dtype=np.float64)
    lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        return 1
    x = (x - lo) / (hi - lo)
    n = x.shape[0]
    k_top = min(k_max, len(np.unique(x)))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6A9]))
    tiny = 1e-300
    real = np.log(np.maximum(kmeans_1d_inertias(x, k_top), tiny))
    ref = np.log(np.maximum([kmeans_1d_inertias(rng.random((n,)), k_top) for _ in range(references)], tiny))
    gaps = ref.mean(axis=0) - real
    sds = ref.std(axis=0) * math.sqrt(1.0 + 1.0 / references)
    for k in range(1, k_top):
        if gaps[k - 1] >= gaps[k] - sds[k]:
            return k
    return k_top


def high_cluster(scores: Sequence[float], seed: int) -> list[int]:
    """Positions in the higher-mean cluster of KMeans(k = 2) on the 1-D ``scores``."""
    from sklearn.cluster import KMeans  # imported here: scikit-learn takes seconds to load

    x = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
    labels = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(x).labels_
    means = [float(x[labels == c].mean()) for c in (0, 1)]
    bad = int(np.argmax(means))
    return [i for i, label in enumerate(labels) if int(label) == bad]


def first_active_round(window: int) -> int:
    """The first round (0-based) in which detection can act: the window then holds ``window`` (s, y) pairs,
    i.e. ``window`` + 1 recorded rounds before the current one."""
    return window + 1


@functools.cache
def _warn_too_short(window: int, rounds: int) -> None:
    """Log, once per process for a (window, rounds) pair (a run builds its defense more than once), that detection
    will never act."""
    fix = (
        f"set fldetector_window <= {rounds - 2} to let it act"
        if rounds >= 3
        else "no window can act in fewer than 3 rounds"
    )
    log.warning(
        "fldetector: detection acts from round %d on (0-based: once the window holds fldetector_window = %d (s, y) "
        "pairs, i.e. %d past rounds), but the run has %d rounds: FLDetector will average every client like FedAvg; %s",
        first_active_round(window),
        window,
        window + 1,
        rounds,
        fix,
    )


@dataclass(frozen=True)
class FLDetectorOptions:
    """FLDetector's options (``fldetector_*``); the seed comes from the threat model."""

    window: int = option(
        10, "fldetector_window", "window N >= 1 of past rounds for L-BFGS and the mean score (KDD'22: 10)"
    )
    ban: bool = option(
        False,
        "fldetector_ban",
        "true: flagged clients are never aggregated again (the paper); false: this round only (KDD'22)",
    )
    exclude_int_buffers: bool = option(
        True,
        "exclude_int_buffers",
        "leave integer counters (BN's num_batches_tracked) out of vector statistics (spec D31)",
    )
    rounds: int = option(50, "rounds", "the run's rounds: detection acts from round N + 1 on (0-based), if any")

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"fldetector_window: got {self.window!r}; must be an integer >= 1")
        check_int("rounds", self.rounds, 1)


class FLDetector:
    """L-BFGS-predicted updates; clients far from their predictions over the window are dropped (gap statistic,
    2-means). State per client id, saved in checkpoints."""

    name: ClassVar[str] = "fldetector"
    description: ClassVar[str] = "FLDetector: flags clients whose updates disagree with L-BFGS predictions (KDD'22)"
    needs_server_data: ClassVar[bool] = False
    options_type: ClassVar[type[FLDetectorOptions]] = FLDetectorOptions

    def __init__(self, options: FLDetectorOptions | None = None, threat: ThreatModel | None = None) -> None:
        self.options = options if options is not None else FLDetectorOptions()
        if self.options.rounds < first_active_round(self.options.window) + 1:
            _warn_too_short(self.options.window, self.options.rounds)
        self.seed = (threat if threat is not None else ThreatModel()).seed
        self.rounds: list[int] = []
        self.globals: list[torch.Tensor] = []
        self.aggregates: list[torch.Tensor] = []
        self.last_update: dict[int, torch.Tensor] = {}
        self.last_round: dict[int, int] = {}
        self.scores: dict[int, list[float]] = {}
        self.banned: set[int] = set()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[int, torch.Tensor]:
        """``{client id: its last update}`` plus, under negative keys, the window (−1 global states, −2 aggregate
        updates, −3 their rounds) and the client table (−4: id, last round, banned, N scores NaN-padded)."""
        out: dict[int, torch.Tensor] = {k: u.detach().cpu().clone() for k, u in sorted(self.last_update.items())}
        width = 0 if not self.globals else self.globals[0].shape[0]
        out[GLOBALS] = torch.stack(self.globals).cpu().clone() if self.globals else torch.zeros(0, width)
        out[AGGREGATES] = torch.stack(self.aggregates).cpu().clone() if self.aggregates else torch.zeros(0, width)
        out[ROUNDS] = torch.tensor(self.rounds, dtype=torch.float64)
        ids = sorted(set(self.last_round) | set(self.scores) | self.banned)
        table = torch.full((len(ids), 3 + self.options.window), math.nan, dtype=torch.float64)
        for row, k in enumerate(ids):
            hist = self.scores.get(k, [])
            table[row, 0] = k
            table[row, 1] = self.last_round.get(k, -1)
            table[row, 2] = float(k in self.banned)
            table[row, 3 : 3 + len(hist)] = torch.tensor(hist, dtype=torch.float64)
        out[TABLE] = table
        return out

    def load_state_dict(self, state: Mapping[int | str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` wrote (string ids accepted); ``ValueError`` on anything else."""
        items = {int(k): v for k, v in state.items()}
        for key in (GLOBALS, AGGREGATES, ROUNDS, TABLE):
            if key not in items or not isinstance(items[key], torch.Tensor):
                raise ValueError(f"fldetector state: entry {key} missing or not a tensor")
        glob, aggs, rounds, table = items[GLOBALS], items[AGGREGATES], items[ROUNDS], items[TABLE]
        n_win = self.options.window
        if glob.dim() != 2 or aggs.shape != glob.shape or rounds.shape != (glob.shape[0],) or glob.shape[0] > n_win + 1:
            raise ValueError(f"fldetector state: window shapes {tuple(glob.shape)}, {tuple(aggs.shape)} do not fit")
        if table.dim() != 2 or table.shape[1] != 3 + n_win:
            raise ValueError(f"fldetector state: client table of shape {tuple(table.shape)}; expected [c, {3 + n_win}]")
        updates: dict[int, torch.Tensor] = {}
        for k, u in items.items():
            if k >= 0:
                if not isinstance(u, torch.Tensor) or u.dim() != 1 or (glob.shape[0] and u.shape[0] != glob.shape[1]):
                    raise ValueError(f"fldetector state of client {k}: expected a 1-D update of the model's size")
                updates[k] = u.detach().clone()
        self.globals = [g.clone() for g in glob]
        self.aggregates = [a.clone() for a in aggs]
        self.rounds = [int(r) for r in rounds.tolist()]
        self.last_update = updates
        self.last_round, self.scores, self.banned = {}, {}, set()
        for row in table.tolist():
            k = int(row[0])
            if row[1] >= 0:
                self.last_round[k] = int(row[1])
            if row[2]:
                self.banned.add(k)
            hist = [float(v) for v in row[3:] if not math.isnan(v)]
            if hist:
                self.scores[k] = hist

    # ------------------------------------------------------------------ one round

    def _distances(self, ids: Sequence[int], theta: torch.Tensor, updates: torch.Tensor) -> dict[int, float]:
        """‖û_k − u_k‖ for the clients that can be predicted (last round still in the window)."""
        where = {r: i for i, r in enumerate(self.rounds)}
        rows = [i for i, k in enumerate(ids) if self.last_round.get(k) in where and k in self.last_update]
        if not rows or len(self.rounds) < 2:
            return {}
        g = torch.stack(self.globals).to(torch.float64)
        a = torch.stack(self.aggregates).to(torch.float64)
        s, y = g[1:] - g[:-1], a[1:] - a[:-1]
        s, y = s[-self.options.window :], y[-self.options.window :]
        theta64 = theta.to(torch.float64).cpu()
        v = torch.stack([theta64 - g[where[self.last_round[ids[i]]]] for i in rows])
        prev = torch.stack([self.last_update[ids[i]].to(torch.float64) for i in rows])
        pred = prev + lbfgs_hvp(s, y, v)
        dist = torch.linalg.vector_norm(pred - updates[rows].to(torch.float64).cpu(), dim=1)
        return {ids[i]: float(d) for i, d in zip(rows, dist.tolist())}

    def aggregate(self, inputs: RoundInputs) -> Aggregate:
        ids = inputs.client_ids
        mask = stat_mask(inputs.layout, self.options.exclude_int_buffers, inputs.client_states.device)
        theta = inputs.global_state[mask]
        updates = inputs.updates[:, mask]
        seed = (self.seed * 1_000_003 + inputs.round) % (2**32)

        dist = self._distances(ids, theta, updates)
        scored = sorted(dist)
        scores = dict(self.scores)
        for k, d in zip(scored, normalised_distances(torch.tensor([dist[k] for k in scored])).tolist()):
            scores[k] = [*scores.get(k, []), d][-self.options.window :]

        judged = sorted(k for k in ids if scores.get(k) and k not in self.banned)
        mean_scores = {k: float(np.mean(scores[k])) for k in judged}
        clusters = 1
        flagged: list[int] = []
        active = len(self.rounds) > self.options.window and len(judged) >= 2
        if active:
            values = [mean_scores[k] for k in judged]
            clusters = gap_statistic(values, seed)
            if clusters >= 2:
                flagged = sorted(judged[i] for i in high_cluster(values, seed))
        banned = self.banned | set(flagged) if self.options.ban else set(self.banned)
        dropped = set(flagged) | banned
        kept = [i for i, k in enumerate(ids) if k not in dropped]

        w = torch.zeros(inputs.n, dtype=torch.float64)
        if kept:
            w[kept] = 1.0 / len(kept)
            new = weighted_average(inputs.client_states, w.to(inputs.client_states.device))
            agg_update = weighted_average(updates, w.to(updates.device))
        else:
            log.info("fldetector: every client of round %d is dropped; the global state is unchanged", inputs.round)
            new = inputs.global_state.clone()
            agg_update = torch.zeros_like(theta)
        new = finite_global(new, self.name)

        # the scores, the window and each client's last update, for the next rounds (nothing changes on an error)
        self.scores, self.banned = scores, banned
        self.rounds.append(inputs.round)
        self.globals.append(theta.detach().cpu().clone())
        self.aggregates.append(agg_update.detach().cpu().clone())
        del self.rounds[: -self.options.window - 1], self.globals[: -self.options.window - 1]
        del self.aggregates[: -self.options.window - 1]
        for k, u in zip(ids, updates):
            self.last_update[k] = u.detach().cpu().clone()
            self.last_round[k] = inputs.round

        return Aggregate(
            global_state=new,
            weights=w if kept else None,
            accepted=tuple(ids[i] for i in kept),
            diagnostics={
                "weights": as_weight_list(w, ids),
                "scores": {str(k): v for k, v in mean_scores.items()},
                "distances": {str(k): v for k, v in dist.items()},
                "detection_active": active,
                "gap_clusters": clusters,
                "flagged": flagged,
                "banned": sorted(self.banned),
                "removed": sorted(ids[i] for i in range(inputs.n) if i not in set(kept)),
            },
        )
