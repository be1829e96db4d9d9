"""``min_sum``: the AGR-agnostic min-sum attack of Shejwalkar & Houmansadr, NDSS 2021, §IV-B (ATTACKS.md §A4).

Every attacker sends θ_g + μ + λp, λ the largest value with Σ_i ‖u_m − u_i‖² ≤ max_i Σ_j ‖u_i − u_j‖² over the benign
updates: the sum of squared distances of the malicious update to the benign ones stays below that of the worst
benign update. The direction p (``perturbation``), the bisection (``minmax_lambda_init``, ``minmax_tol``) and every
choice are those of :mod:`spmc.attacks.min_max`. Since Σ_i ⟨p, u_i − μ⟩ = 0, the left side is Σ_i ‖u_i − μ‖² + nλ²‖p‖²:
the exact answer is λ* = √((bound − Σ_i ‖u_i − μ‖²)/(n‖p‖²)), which the tests check the bisection against.
"""

from __future__ import annotations

from typing import ClassVar

from spmc.attacks.min_max import MinMax, Objective


class MinSum(MinMax):
    """Min-sum: the farthest point along p whose summed squared distance to the benign updates is within that of
    the worst benign update."""

    name: ClassVar[str] = "min_sum"
    description: ClassVar[str] = (
        "min-sum: θ_g + μ + λp, Σ_i ‖u_m − u_i‖² ≤ max_i Σ_j ‖u_i − u_j‖² (Shejwalkar & Houmansadr, NDSS 2021)"
    )
    objective: ClassVar[Objective] = "min_sum"
