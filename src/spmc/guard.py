"""The update guard: a safety net in front of every defense against client states that break float arithmetic.

It is **not a defense**. It refuses only states no training can produce and that would turn the global model into
Inf or NaN (one client at 1e38 in float32 overflows any average it enters), so an experiment whose updates are
physically plausible — the scaling attacks of the literature included (Γ up to 100) — is never touched. With
u_k = θ_k − θ_g over the float entries (integer counters left out) and M the lower median of ‖u_j‖ over the states
of the round that pass the first two checks, a state θ_k is refused when

    1. it has the wrong size, or holds NaN or ±Inf;
    2. max_i |θ_k,i| ≥ ``max_abs``                               (default 1e15);
    3. ‖u_k‖ > ``norm_ratio`` · M, only when M > 0               (default 1e6).

Norms are computed in float64 on values scaled by their max |·|, so they never overflow. M is the lower median
(``torch.median``), so with two clients the smaller update is the reference. When M = 0 (most clients sent back θ_g
unchanged) the ratio test is skipped: only check 2 applies. ``enabled = False`` keeps check 1 only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spmc.params import ParamLayout


class InvalidUpdateError(RuntimeError):
    """A client state was refused and ``on_invalid_update = 'stop'``, no valid state was left, or the defense
    produced a non-finite global state."""


@dataclass(frozen=True)
class UpdateGuard:
    """The thresholds of the guard (``update_guard``, ``update_guard_max_abs``, ``update_guard_norm_ratio``)."""

    enabled: bool = True
    max_abs: float = 1e15
    norm_ratio: float = 1e6

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_abs) and self.max_abs > 0):
            raise ValueError(f"update_guard_max_abs: got {self.max_abs!r}; must be a finite number > 0")
        if not (math.isfinite(self.norm_ratio) and self.norm_ratio >= 1):
            raise ValueError(f"update_guard_norm_ratio: got {self.norm_ratio!r}; must be a finite number >= 1")


def safe_norms(rows: torch.Tensor) -> torch.Tensor:
    """‖x_k‖ of every row of [n, d], float64, without overflow: ‖x‖ = s·‖x/s‖ with s = max |x| (0 for a zero row)."""
    x = rows.to(torch.float64)
    scale = x.abs().amax(dim=1) if x.shape[1] else torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    norms: torch.Tensor = (x / safe.unsqueeze(1)).norm(dim=1) * scale
    return norms


def state_problem(state: torch.Tensor, dim: int) -> str | None:
    """Check 1: what is wrong with one client state's shape or values, or None."""
    if state.shape != (dim,):
        return f"has shape {tuple(state.shape)}, expected ({dim},)"
    if not bool(torch.isfinite(state).all()):
        return "holds NaN or Inf"
    return None


def guard_states(
    global_state: torch.Tensor,
    states: list[torch.Tensor],
    float_mask: torch.Tensor,
    guard: UpdateGuard,
) -> list[str | None]:
    """For each state, why the guard refuses it (checks 1-3 of the module docstring), or None if it passes."""
    dim = global_state.shape[0]
    problems = [state_problem(s, dim) for s in states]
    if not guard.enabled:
        return problems
    for i, s in enumerate(states):
        if problems[i] is None:
            peak = float(s.abs().max()) if s.numel() else 0.0
            if peak >= guard.max_abs:
                problems[i] = f"has a value of magnitude {peak:.3g} >= update_guard_max_abs = {guard.max_abs:.3g}"
    ok = [i for i, p in enumerate(problems) if p is None]
    if len(ok) < 2:
        return problems
    stacked = torch.stack([states[i] for i in ok])
    norms = safe_norms(stacked[:, float_mask] - global_state[float_mask].to(stacked.dtype))
    median = float(norms.median())
    if median > 0:
        for i, norm in zip(ok, norms.tolist()):
            if norm > guard.norm_ratio * median:
                problems[i] = (
                    f"has an update norm {norm:.3g} > update_guard_norm_ratio × the round's median "
                    f"({guard.norm_ratio:.3g} × {median:.3g})"
                )
    return problems


def describe_refusals(refused: dict[int, str]) -> str:
    """The guard's reasons in one line, clients with the same reason together: ``clients [0, 2]: holds NaN or Inf;
    clients [1]: has …``."""
    by_reason: dict[str, list[int]] = {}
    for k, problem in refused.items():
        by_reason.setdefault(problem, []).append(k)
    return "; ".join(f"clients {sorted(ids)}: {problem}" for problem, ids in by_reason.items())


def finalise_global(state: torch.Tensor, layout: ParamLayout, defense: str, t: int) -> torch.Tensor:
    """A defense's new global state with integer counters rounded; a non-finite one (a defense bug) raises
    :class:`InvalidUpdateError` naming the defense and the round."""
    out = state.detach().clone()
    int_mask = layout.int_mask(out.device)
    out[int_mask] = out[int_mask].round()
    if not bool(torch.isfinite(out).all()):
        raise InvalidUpdateError(f"round {t}: defense {defense!r} produced a non-finite global state")
    return out
