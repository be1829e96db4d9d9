"""``defense_aware``: the black-box adaptive backdoor attack for any defense (ATTACKS.md §A5).

Source: Shejwalkar & Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and Defenses for
Federated Learning", NDSS 2021 — their *AGR-tailored* attack searches the scale of a malicious perturbation by
calling the aggregation rule itself; here the search is turned towards a backdoor (ByzFL's ``Optimal_*`` attacks do
the same for Byzantine ones). It calls the real ``aggregate`` of a **deep copy** of the server's defense, so it works
unchanged for every registered defense and for third-party plug-ins.

In an attack round, with θ_g the global state, θ_k the attackers' trained (poisoned) states and B the benign set:

    δ      = mean_k (θ_k − θ_g)                                     the backdoor direction
    μ_B    = mean_{b ∈ B} (θ_b − θ_g)                               the mean benign update
    M(γ)   = θ_g + μ_B + γ·δ                                        sent by every attacker
    D(γ)   = ⟨agg(B ∪ M(γ)) − agg(B ∪ M(0)), δ⟩ / ‖δ‖               the aggregate's displacement along δ

and every attacker sends M(γ*). D is measured on the float entries of a state (integer counters left out).

**The objective (choice).** ATTACKS.md says "keep the γ that maximises the displacement", and its test says "with
FedAvg it finds the scale that ``scaling`` would use". With FedAvg D grows linearly in γ, so a plain argmax is always
the top of the grid; the consistent reading, implemented here: the attackers want the aggregate moved by the whole
backdoor, D = ‖δ‖ (model replacement), and no further (more only adds detectability). So γ* is the **smallest γ with
D(γ) ≥ ‖δ‖**: the grid γ ∈ {2^a, …, 2^b} (``da_grid_min_exp`` a = −4, ``da_grid_max_exp`` b = 6) is scanned upwards
until a point reaches ‖δ‖, then bisection between it and the grid point below (0 below the first point; D(0) = 0)
returns the smallest value known to reach. If no grid point reaches ‖δ‖, γ* is the grid point of the largest D (ties:
the smallest γ), refined by a geometric pattern search between its neighbours with the calls left. With FedAvg,
uniform counts, n participants of which m attack: D(γ) = m·γ·‖δ‖/n, so γ* = n/m = K/m, ``scaling``'s Γ.

**Budget.** At most ``da_max_calls`` (24) ``aggregate`` calls per round, the reference M(0) included: 1 + at most 11
grid points + bisection. A candidate whose call raises ``ValueError`` (the defense refuses that round) or returns a
non-finite state counts as D = −∞ (logged at debug level). When even the reference call fails, or the attackers did
not move (‖δ‖ = 0), they send M(1) (logged).

**The defense's state is never touched.** Every call aggregates a fresh ``copy.deepcopy`` of the server's defense
(FoolsGold's history, FLDetector's window, centered clipping's centre stay as they were), inside a fork of the torch
and NumPy global random generators (a defense drawing from them would otherwise shift the run's streams).

**Choices.**

* Every attacker sends the same state M(γ*) (as the AGR-tailored attack and ``lie``/``min_max`` do): identical
  malicious rows are what distance-based rules (Krum, clustering) favour most, and one γ is searched for all.
* The benign set B follows ``attacker_knowledge``: ``full``, the round's benign states, their ids and sample counts;
  ``partial``, the attackers' clean models, replicated (row j = clean model j mod m) to the round's K − m benign
  clients as the attackers know it (:func:`spmc.attacks.crafting.round_clients`: the run's K), with the smallest ids
  that are not the attackers' and the attackers' own sample counts — no benign client's state or count is read.
  With B empty (every participant attacks), μ_B = 0 and the simulated round is M alone.
* The simulated round is handed to the defense as the server would (:meth:`spmc.server.ServerCore.
  round_inputs_builder`: θ_g, layout, round, the server's data when the defense needs it), ordered by id. The
  attackers thus know the defense, its options, its state and the server's data (the omniscient adaptive setting of
  §A5, under both knowledge settings); the update guard is not simulated (a crafted state passes it like any other).
* The chosen γ, the calls spent and the relative displacement D(γ*)/‖δ‖ go to the round's record under
  ``crafting`` (``da_gamma``, ``da_calls``, ``da_displacement``) and to the log at info level.
* No randomness: no seed stream.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from spmc.attacks.base import Attack, CraftingInputs, Hook, MakeInputs
from spmc.attacks.crafting import repeat_rows, round_clients, to_states
from spmc.options import option

log = logging.getLogger(__name__)

#: The most a grid exponent may be in absolute value (2^±60 already leaves float32's useful range of scales).
MAX_EXP = 60


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}: got {value!r}; must be an integer in [{low}, {high}]")


@dataclass(frozen=True)
class DefenseAwareOptions:
    """The grid 2^min_exp … 2^max_exp of the scale γ and the per-round budget of ``aggregate`` calls."""

    grid_min_exp: int = option(
        -4, key="da_grid_min_exp", help="defense_aware: smallest grid scale 2^e, e in −60 … 60 (ATTACKS.md §A5)"
    )
    grid_max_exp: int = option(
        6, key="da_grid_max_exp", help="defense_aware: largest grid scale 2^e, da_grid_min_exp … 60 (ATTACKS.md §A5)"
    )
    max_calls: int = option(
        24, key="da_max_calls", help="defense_aware: most defense aggregate calls per round, >= 2 (ATTACKS.md §A5)"
    )

    def __post_init__(self) -> None:
        _check_int("da_grid_min_exp", self.grid_min_exp, -MAX_EXP, MAX_EXP)
        _check_int("da_grid_max_exp", self.grid_max_exp, -MAX_EXP, MAX_EXP)
        if self.grid_max_exp < self.grid_min_exp:
            raise ValueError(
                f"da_grid_max_exp: got {self.grid_max_exp}; must be >= da_grid_min_exp = {self.grid_min_exp}"
            )
        _check_int("da_max_calls", self.max_calls, 2, 10_000)

    @property
    def grid(self) -> list[float]:
        """The grid scales, ascending."""
        return [2.0**e for e in range(self.grid_min_exp, self.grid_max_exp + 1)]


@contextmanager
def _forked_rng(device: torch.device) -> Iterator[None]:
    """The torch (CPU and ``device``) and NumPy global generators restored on exit."""
    state = np.random.get_state()
    devices: list[int] = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        np.random.set_state(state)


@dataclass
class SimulatedRound:
    """B ∪ M(γ) as the defense sees it: the benign rows, the attackers' ids and the order by id."""

    global_state: torch.Tensor  # float64 [d]
    benign: torch.Tensor  # [n_b, d], the states' dtype
    benign_ids: tuple[int, ...]
    benign_counts: torch.Tensor  # float64 [n_b]
    attacker_ids: tuple[int, ...]
    attacker_counts: torch.Tensor  # float64 [m]
    base: torch.Tensor  # float64 [d]: θ_g + μ_B
    delta: torch.Tensor  # float64 [d]
    like: torch.Tensor  # dtype/device of the states

    def state(self, gamma: float) -> torch.Tensor:
        """M(γ) = θ_g + μ_B + γ·δ in the states' dtype."""
        return to_states(self.base + gamma * self.delta, self.like)

    def inputs(self, gamma: float, make_inputs: MakeInputs) -> Any:
        """The RoundInputs of B ∪ M(γ), rows ordered by id."""
        m = len(self.attacker_ids)
        states = torch.cat([self.benign, repeat_rows(self.state(gamma), m)])
        ids = self.benign_ids + self.attacker_ids
        counts = torch.cat([self.benign_counts, self.attacker_counts])
        order = sorted(range(len(ids)), key=lambda i: ids[i])
        index = torch.tensor(order, dtype=torch.long, device=states.device)
        return make_inputs(states.index_select(0, index), [ids[i] for i in order], counts[order])


def simulated_round(inputs: CraftingInputs, num_clients: int) -> SimulatedRound:
    """B and the backdoor direction of ``inputs`` per knowledge (module docstring): under ``full`` (benign ids
    given, or no benign row) the round's benign rows; under ``partial`` the clean estimates replicated to K − m."""
    g = inputs.global_state.to(torch.float64)
    attackers = inputs.attacker_states
    m = attackers.shape[0]
    delta = (attackers.to(torch.float64) - g).mean(dim=0)
    attacker_counts = inputs.attacker_counts if inputs.attacker_counts is not None else torch.ones(m)
    benign = inputs.benign_states
    counts = inputs.benign_counts if inputs.benign_counts is not None else torch.ones(benign.shape[0])
    mu = (benign.to(torch.float64) - g).mean(dim=0) if benign.shape[0] else torch.zeros_like(g)
    if inputs.benign_ids or benign.shape[0] == 0:
        ids = inputs.benign_ids
    else:  # partial: the clean estimates stand for the K − m benign clients the attackers do not see
        n_b = round_clients(inputs, num_clients) - m
        rows = [j % benign.shape[0] for j in range(n_b)]
        taken = set(inputs.attacker_ids)
        ids = tuple(itertools.islice((k for k in itertools.count() if k not in taken), n_b))
        benign, counts = benign[rows], counts.to(torch.float64)[rows]
    return SimulatedRound(
        global_state=g,
        benign=benign,
        benign_ids=tuple(ids),
        benign_counts=counts.to(torch.float64),
        attacker_ids=inputs.attacker_ids,
        attacker_counts=attacker_counts.to(torch.float64),
        base=g + mu,
        delta=delta,
        like=attackers,
    )


class DefenseAware(Attack):
    """The attackers search the scale γ of their backdoor direction by calling a copy of the server's defense."""

    name: ClassVar[str] = "defense_aware"
    description: ClassVar[str] = (
        "adaptive: θ_g + μ_B + γ·δ, γ the smallest scale that moves a copy of the defense's aggregate by ‖δ‖ along "
        "the backdoor δ (≤ da_max_calls calls; Shejwalkar & Houmansadr 2021, AGR-tailored)"
    )
    hooks: ClassVar[frozenset[Hook]] = frozenset({"crafting"})
    carries_backdoor: ClassVar[bool] = True
    options_type: ClassVar[type[DefenseAwareOptions]] = DefenseAwareOptions
    options: DefenseAwareOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last: dict[str, Any] = {}

    def crafting_diagnostics(self) -> dict[str, Any]:
        """``da_gamma`` (γ*), ``da_calls`` (aggregate calls spent), ``da_displacement`` (D(γ*)/‖δ‖) of the last
        craft."""
        return dict(self._last)

    def craft(self, inputs: CraftingInputs) -> torch.Tensor:
        """Every attacker sends M(γ*) (module docstring)."""
        if inputs.defense is None or inputs.make_inputs is None:
            raise ValueError(
                "defense_aware: the crafting step was given no defense (CraftingInputs.defense / make_inputs); it "
                "runs inside the server's round (spmc.server.ServerCore)"
            )
        sim = simulated_round(inputs, self.threat.num_clients)
        mask = self.float_mask(sim.delta.device)
        direction = sim.delta if mask is None else torch.where(mask, sim.delta, torch.zeros_like(sim.delta))
        norm = float(direction.norm())
        gamma, calls, reached = 1.0, 0, math.nan
        if norm > 0 and math.isfinite(norm):
            gamma, calls, reached = self._search(inputs, sim, direction, norm)
        else:
            log.info("round %d: defense_aware: the attackers did not move (‖δ‖ = 0); sending θ_g + μ_B", inputs.round)
        self._last = {"da_gamma": gamma, "da_calls": calls, "da_displacement": reached}
        log.info(
            "round %d: defense_aware against %s: γ = %.6g (%d aggregate calls, D/‖δ‖ = %.4g)",
            inputs.round,
            getattr(inputs.defense, "name", type(inputs.defense).__name__),
            gamma,
            calls,
            reached,
        )
        return repeat_rows(sim.state(gamma), inputs.attacker_states.shape[0])

    def _search(
        self, inputs: CraftingInputs, sim: SimulatedRound, direction: torch.Tensor, norm: float
    ) -> tuple[float, int, float]:
        """(γ*, calls spent, D(γ*)/‖δ‖): the grid, then bisection (or a pattern search around the best)."""
        pristine = inputs.defense
        make_inputs = inputs.make_inputs
        assert make_inputs is not None
        budget = self.options.max_calls
        calls = 0

        def aggregate(gamma: float) -> torch.Tensor | None:
            nonlocal calls
            calls += 1
            defense = copy.deepcopy(pristine)
            try:
                with _forked_rng(sim.global_state.device):
                    out = defense.aggregate(sim.inputs(gamma, make_inputs)).global_state
            except ValueError as err:
                log.debug("round %d: defense_aware: γ = %g refused by the defense (%s)", inputs.round, gamma, err)
                return None
            out = out.to(torch.float64)
            return out if bool(torch.isfinite(out).all()) else None

        reference = aggregate(0.0)
        if reference is None:
            log.warning("round %d: defense_aware: the defense refuses the round without backdoor; γ = 1", inputs.round)
            return 1.0, calls, math.nan
        ref = reference

        def displacement(gamma: float) -> float:
            agg = aggregate(gamma)
            if agg is None:
                return -math.inf
            return float((agg - ref) @ direction) / norm

        seen: dict[float, float] = {0.0: 0.0}
        lo = 0.0
        for gamma in self.options.grid:
            if calls >= budget:
                break
            seen[gamma] = displacement(gamma)
            if seen[gamma] >= norm:
                return self._bisect(lo, gamma, seen, displacement, budget, lambda: calls, norm)
            lo = gamma
        return self._pattern(seen, displacement, budget, lambda: calls, norm)

    @staticmethod
    def _bisect(
        lo: float,
        hi: float,
        seen: dict[float, float],
        displacement: Callable[[float], float],
        budget: int,
        spent: Callable[[], int],
        norm: float,
    ) -> tuple[float, int, float]:
        """The smallest γ known to reach D ≥ ‖δ‖, bisecting [lo, hi] (D(lo) < ‖δ‖ ≤ D(hi)) with the calls left."""
        while spent() < budget:
            mid = 0.5 * (lo + hi)
            if not lo < mid < hi:
                break
            seen[mid] = displacement(mid)
            if seen[mid] >= norm:
                hi = mid
            else:
                lo = mid
        return hi, spent(), seen[hi] / norm

    @staticmethod
    def _pattern(
        seen: dict[float, float],
        displacement: Callable[[float], float],
        budget: int,
        spent: Callable[[], int],
        norm: float,
    ) -> tuple[float, int, float]:
        """No scale reached ‖δ‖: the γ > 0 of the largest D (ties: the smallest γ), refined by geometric midpoints
        towards its neighbours (each kept when strictly better) with the calls left."""
        tried = sorted(g for g in seen if g > 0)
        if not tried:
            return 1.0, spent(), math.nan
        best = min(tried, key=lambda g: (-seen[g], g))
        if seen[best] == -math.inf:
            log.warning("defense_aware: the defense refused every candidate; γ = 1")
            return 1.0, spent(), math.nan
        i = tried.index(best)
        left = tried[i - 1] if i > 0 else best / 2
        right = tried[i + 1] if i + 1 < len(tried) else best * 2
        while spent() < budget:
            moved = False
            for other in (left, right):
                if spent() >= budget:
                    break
                mid = math.sqrt(best * other)
                if mid in seen or mid == best:
                    continue
                seen[mid] = displacement(mid)
                if seen[mid] > seen[best] or (seen[mid] == seen[best] and mid < best):
                    left, right = (left, best) if mid < best else (best, right)
                    best, moved = mid, True
                    break
            if not moved:
                left, right = math.sqrt(left * best), math.sqrt(best * right)
                if right / left < 1 + 1e-9:
                    break
        return best, spent(), seen[best] / norm
