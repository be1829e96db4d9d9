"""``min_max`` (and the shared search of ``min_sum``): the AGR-agnostic attacks of Shejwalkar & Houmansadr,
"Manipulating the Byzantine: Optimizing Model Poisoning Attacks and Defenses for Federated Learning", NDSS 2021,
§IV-B (ATTACKS.md §A4).

Over the benign updates u_1 … u_n (u_i = θ_i − θ_g) with mean μ, every attacker sends θ_g + u_m with

    u_m = μ + λ·p,   p = −μ/‖μ‖ (``perturbation = unit`` [REC]), −σ (``std``), −sign(μ) (``sign``)

and λ the largest value such that

    min-max:  max_i ‖u_m − u_i‖   ≤ max_{i,j} ‖u_i − u_j‖
    min-sum:  Σ_i ‖u_m − u_i‖²    ≤ max_i Σ_j ‖u_i − u_j‖²      (:mod:`spmc.attacks.min_sum`)

found by the paper's bisection (its Algorithm 1): λ = λ₀ = ``minmax_lambda_init`` (10), step = λ₀/2, λ_succ = 0;
while |λ_succ − λ| > τ (``minmax_tol``, 1e-5): if λ satisfies the constraint, λ_succ ← λ and λ ← λ + step, else
λ ← λ − step; step ← step/2. The answer is λ_succ. λ = 0 always satisfies both constraints (μ is inside the benign
set's spread), and the feasible λ ≥ 0 form an interval (the distances are convex in λ), so the search returns the
largest feasible λ within about 2τ, **searched in [0, 2λ₀)** as in the paper: a larger feasible λ is cut at 2λ₀.

Computation: with D_i = u_i − μ, e_i = ⟨p, D_i⟩ and c = ‖p‖², ‖u_m − u_i‖² = ‖D_i‖² − 2λ·e_i + λ²·c, so one
float64 pass over column blocks gives the Gram matrix of the D_i, e and c, and the bisection is scalar arithmetic
(squared distances compared, which is the same test as the norms). Choices: σ of ``std`` is the sample standard
deviation (``torch.std``, as the authors' code); p = 0 when μ = 0 (``unit``); with no benign client in the round the
attackers' own updates are the benign estimate; with one benign update the bound is 0 and λ = 0 unless p = 0.
The crafted update stays within the benign spread, so the update guard never refuses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from spmc.attacks.base import Attack, CraftingInputs, Hook
from spmc.attacks.crafting import benign_set, block_updates, column_blocks, mean_std, repeat_rows, to_states
from spmc.options import option

Perturbation = Literal["unit", "std", "sign"]
PERTURBATIONS: tuple[str, ...] = ("unit", "std", "sign")
Objective = Literal["min_max", "min_sum"]


@dataclass(frozen=True)
class MinMaxOptions:
    """The perturbation direction and the bisection's start and tolerance (shared by ``min_max`` and ``min_sum``)."""

    perturbation: Perturbation = option(
        "unit",
        key="perturbation",
        help="min-max/min-sum direction p: unit = −μ/‖μ‖, std = −σ, sign = −sign(μ) (NDSS 2021)",
    )
    lambda_init: float = option(
        10.0,
        key="minmax_lambda_init",
        help="min-max/min-sum bisection start λ₀ > 0; λ is searched in [0, 2λ₀) (NDSS 2021)",
    )
    tol: float = option(1e-5, key="minmax_tol", help="min-max/min-sum bisection tolerance on λ, > 0 (NDSS 2021)")

    def __post_init__(self) -> None:
        if self.perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation: got {self.perturbation!r}; allowed: {', '.join(PERTURBATIONS)}")
        if isinstance(self.lambda_init, bool) or not (math.isfinite(self.lambda_init) and self.lambda_init > 0):
            raise ValueError(f"minmax_lambda_init: got {self.lambda_init!r}; must be a finite number > 0")
        if isinstance(self.tol, bool) or not (math.isfinite(self.tol) and self.tol > 0):
            raise ValueError(f"minmax_tol: got {self.tol!r}; must be a finite number > 0")


@dataclass(frozen=True)
class Geometry:
    """What the search needs, float64: ``gram`` of D_i = u_i − μ [n, n], e_i = ⟨p, D_i⟩ [n], c = ‖p‖², and the
    candidate's parts μ and p [d]."""

    gram: torch.Tensor
    e: torch.Tensor
    c: float
    mu: torch.Tensor
    p: torch.Tensor

    def sq_distances(self, lam: float) -> torch.Tensor:
        """‖u_m − u_i‖² = ‖D_i‖² − 2λ·e_i + λ²·c for u_m = μ + λp, every i (clamped at 0)."""
        return (self.gram.diagonal() - 2.0 * lam * self.e + lam * lam * self.c).clamp_min(0.0)

    def pairwise(self) -> torch.Tensor:
        """‖u_i − u_j‖² [n, n] from the Gram matrix (clamped at 0, zero diagonal)."""
        sq = self.gram.diagonal()
        dist = (sq[:, None] + sq[None, :] - 2.0 * self.gram).clamp_min(0.0)
        return dist.fill_diagonal_(0.0)


def geometry(benign: torch.Tensor, global_state: torch.Tensor, perturbation: str) -> Geometry:
    """One float64 pass over column blocks of the benign states [n, d] (for ``unit``, p and e are accumulated
    for −μ and divided by ‖μ‖ at the end)."""
    n, d = benign.shape
    device = global_state.device
    gram = torch.zeros((n, n), dtype=torch.float64, device=device)
    mu = torch.empty(d, dtype=torch.float64, device=device)
    p = torch.empty(d, dtype=torch.float64, device=device)
    e = torch.zeros(n, dtype=torch.float64, device=device)
    for cols in column_blocks(d):
        u = block_updates(benign, global_state, cols)
        mu_b, sigma_b = mean_std(u)
        centred = u - mu_b
        gram += centred @ centred.T
        mu[cols] = mu_b
        p_b = -sigma_b if perturbation == "std" else (-torch.sign(mu_b) if perturbation == "sign" else -mu_b)
        p[cols] = p_b
        e += centred @ p_b
    if perturbation == "unit":
        norm = float(mu.norm())
        scale = 1.0 / norm if norm > 0 and math.isfinite(norm) else 0.0
        p, e = p * scale, e * scale
    return Geometry(gram, e, float((p * p).sum()), mu, p)


def feasible(geo: Geometry, lam: float, objective: str, bound: float) -> bool:
    """Whether u_m = μ + λp satisfies the objective's constraint."""
    dist = geo.sq_distances(lam)
    value = float(dist.max()) if objective == "min_max" else float(dist.sum())
    return value <= bound


def constraint_bound(geo: Geometry, objective: str) -> float:
    """max_{i,j} ‖u_i − u_j‖² (min-max) or max_i Σ_j ‖u_i − u_j‖² (min-sum)."""
    pair = geo.pairwise()
    return float(pair.max()) if objective == "min_max" else float(pair.sum(dim=1).max())


def search_lambda(geo: Geometry, objective: str, lambda_init: float, tol: float) -> float:
    """The paper's bisection: the largest feasible λ in [0, 2λ₀) within about 2τ (0 when only λ = 0 is)."""
    bound = constraint_bound(geo, objective)
    lam, step, succ = lambda_init, lambda_init / 2, 0.0
    while abs(succ - lam) > tol:
        if feasible(geo, lam, objective, bound):
            succ = lam
            lam += step
        else:
            lam -= step
        step /= 2
    return succ


def craft_min(inputs: CraftingInputs, options: MinMaxOptions, objective: str) -> torch.Tensor:
    """θ_g + μ + λp for every attacker, λ from :func:`search_lambda` over the benign set."""
    geo = geometry(benign_set(inputs), inputs.global_state, options.perturbation)
    lam = search_lambda(geo, objective, options.lambda_init, options.tol)
    state = to_states(inputs.global_state.to(torch.float64) + geo.mu + lam * geo.p, inputs.global_state)
    return repeat_rows(state, inputs.attacker_states.shape[0])


class MinMax(Attack):
    """Min-max: the farthest point along p whose largest distance to a benign update is within the benign spread."""

    name: ClassVar[str] = "min_max"
    description: ClassVar[str] = (
        "min-max: θ_g + μ + λp, max_i ‖u_m − u_i‖ ≤ max_ij ‖u_i − u_j‖ (Shejwalkar & Houmansadr, NDSS 2021)"
    )
    hooks: ClassVar[frozenset[Hook]] = frozenset({"crafting"})
    options_type: ClassVar[type[MinMaxOptions]] = MinMaxOptions
    options: MinMaxOptions
    objective: ClassVar[Objective] = "min_max"

    def craft(self, inputs: CraftingInputs) -> torch.Tensor:
        """The same state θ_g + μ + λp for every attacker."""
        return craft_min(inputs, self.options, self.objective)
