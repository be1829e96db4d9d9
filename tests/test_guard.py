"""The update guard (spmc.guard): hand-computed cases of its three checks, overflow-free norms, plausible attacks
never refused, and its effect on a run (a client at 1e38 no longer poisons the global model)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc import make_experiment
from spmc.config import ConfigError
from spmc.guard import (
    InvalidUpdateError,
    UpdateGuard,
    describe_refusals,
    finalise_global,
    guard_states,
    safe_norms,
)
from spmc.params import ParamLayout
from spmc.simulation import Simulation

SMOKE = {
    "dataset": "synthetic",
    "synthetic_train_size": 400,
    "synthetic_test_size": 50,
    "num_clients": 4,
    "gamma": 0.25,
    "rounds": 2,
    "baseline_local_epochs": 1,
    "batch_size": 32,
    "device": "cpu",
}
ALL = torch.ones(4, dtype=torch.bool)


def rows(*values: list[float], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=dtype) for v in values]


def test_norm_ratio_against_the_lower_median() -> None:
    states = rows([1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 3, 0])  # update norms 1, 2, 3; median 2
    assert guard_states(torch.zeros(4), states, ALL, UpdateGuard(norm_ratio=1.4)) == [None, None, ANY_TEXT]
    assert guard_states(torch.zeros(4), states, ALL, UpdateGuard(norm_ratio=1.5)) == [None, None, None]
    two = rows([0, 0, 0, 1], [0, 0, 0, 5])  # lower median of {1, 5} is 1
    assert guard_states(torch.zeros(4), two, ALL, UpdateGuard(norm_ratio=4.0))[1] is not None


class _AnyText:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and "update_guard_norm_ratio" in other


ANY_TEXT = _AnyText()


def test_updates_are_measured_from_the_global_model_on_float_entries_only() -> None:
    g = torch.tensor([10.0, 10.0, 10.0, 0.0])
    states = rows([11, 10, 10, 0], [10, 11, 10, 0], [10, 10, 11, 1e9])  # the counter entry is left out
    mask = torch.tensor([True, True, True, False])
    assert guard_states(g, states, mask, UpdateGuard(norm_ratio=1.0)) == [None, None, None]


def test_max_abs_is_a_strict_bound_and_shape_nan_inf_always_checked() -> None:
    g = torch.zeros(2, dtype=torch.float64)
    states = rows([1e15, 0], [9.99e14, 0], [math.nan, 0], [math.inf, 0], [0], dtype=torch.float64)
    problems = guard_states(g, states, torch.ones(2, dtype=torch.bool), UpdateGuard(norm_ratio=1e300))
    assert "update_guard_max_abs" in problems[0] and problems[1] is None
    assert "NaN or Inf" in problems[2] and "NaN or Inf" in problems[3] and "shape (1,)" in problems[4]
    off = guard_states(g, states, torch.ones(2, dtype=torch.bool), UpdateGuard(enabled=False))
    assert off[0] is None and off[1] is None and off[2] is not None and off[4] is not None


def test_a_zero_median_skips_the_ratio_check() -> None:
    states = rows([0, 0], [0, 0], [5, 5])
    assert guard_states(torch.zeros(2), states, torch.ones(2, dtype=torch.bool), UpdateGuard()) == [None] * 3


def test_safe_norms_do_not_overflow() -> None:
    x = torch.tensor([[3e38, 3e38], [0.0, 0.0], [1e-45, 0.0]], dtype=torch.float32)
    expected = torch.tensor([3e38 * math.sqrt(2), 0.0, 1.401298464324817e-45], dtype=torch.float64)
    assert torch.allclose(safe_norms(x), expected, rtol=1e-6)
    assert bool(torch.isfinite(safe_norms(torch.full((1, 1000), 1e300, dtype=torch.float64))).all())


@pytest.mark.parametrize("max_abs, ratio", [(0.0, 1e6), (math.inf, 1e6), (1e15, 0.5), (1e15, math.nan)])
def test_bad_thresholds_are_refused(max_abs: float, ratio: float) -> None:
    with pytest.raises(ValueError, match="update_guard"):
        UpdateGuard(max_abs=max_abs, norm_ratio=ratio)
    with pytest.raises(ConfigError, match="update_guard"):
        make_experiment(update_guard_max_abs=max_abs, update_guard_norm_ratio=ratio, **SMOKE)


@settings(max_examples=40, deadline=None)
@given(
    spread=st.floats(1.0, 10.0),
    gamma=st.floats(1.0, 100.0),
    scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e2]),
    seed=st.integers(0, 2**16),
)
def test_scaling_attacks_of_the_literature_are_never_refused(
    spread: float, gamma: float, scale: float, seed: int
) -> None:
    """Benign update norms within a factor ``spread`` of each other, one attacker scaling its update by Γ ≤ 100."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(50, generator=gen)
    updates = torch.randn(6, 50, generator=gen)
    updates = updates / updates.norm(dim=1, keepdim=True) * scale * torch.linspace(1.0, spread, 6).unsqueeze(1)
    updates[5] *= gamma
    states = list(g + updates)
    assert guard_states(g, states, torch.ones(50, dtype=torch.bool), UpdateGuard()) == [None] * 6


def test_finalise_global_rounds_counters_and_names_the_defense_on_nan() -> None:
    layout = ParamLayout.from_module(torch.nn.BatchNorm1d(1))  # weight, bias, running mean/var, counter
    out = finalise_global(torch.tensor([1.0, 2.0, 3.0, 4.0, 6.6]), layout, "fedavg", 3)
    assert out.tolist() == pytest.approx([1.0, 2.0, 3.0, 4.0, 7.0])
    with pytest.raises(InvalidUpdateError, match="round 3: defense 'fedavg'"):
        finalise_global(torch.tensor([1.0, 2.0, 3.0, math.inf, 6.0]), layout, "fedavg", 3)


def _poison(sim: Simulation, client: int, make: object) -> None:
    """Replace ``client``'s returned state with ``make(global, state)`` in every round."""
    original = sim.engine.train_round

    def train_round(start: torch.Tensor, tasks: list) -> list:
        results = original(start, tasks)
        for r in results:
            if r.client_id == client:
                r.state = make(start, r.state)  # type: ignore[operator]
        return results

    sim.engine.train_round = train_round  # type: ignore[method-assign]


def test_a_client_at_1e38_is_dropped_and_the_honest_clients_survive() -> None:
    sim = Simulation(make_experiment(**SMOKE))
    _poison(sim, 3, lambda g, s: torch.full_like(s, 1e38))
    result = sim.run()
    records = result.records
    assert result.summary["rejected_updates"] == 2
    assert [list(r["invalid"]) for r in records] == [["3"], ["3"]]
    assert all(r["rejected"] == [3] for r in records)
    assert all(math.isfinite(r["accuracy"]) for r in records)
    assert float(sim.global_state.abs().max()) < 1e3


def test_without_the_guard_the_same_client_poisons_every_honest_client() -> None:
    """What the guard prevents: the global blows up to ~1e37 and every honest client is NaN the next round."""
    sim = Simulation(make_experiment(**SMOKE, update_guard=False))
    _poison(sim, 3, lambda g, s: torch.full_like(s, 1e38))
    first = sim.run_round(0)
    assert first["invalid"] == {} and float(sim.global_state.abs().max()) > 1e36
    second = sim.run_round(1)
    assert second["rejected"] == [0, 1, 2] and all("NaN or Inf" in p for p in second["invalid"].values())


def test_stop_names_the_attacker_not_an_honest_client() -> None:
    sim = Simulation(make_experiment(**SMOKE, on_invalid_update="stop"))
    _poison(sim, 3, lambda g, s: torch.full_like(s, 1e38))
    with pytest.raises(InvalidUpdateError, match=r"^round 0: client 3's state has a value of magnitude 1e\+38"):
        sim.run()


def test_describe_refusals_groups_clients_by_reason() -> None:
    refused = {3: "holds NaN or Inf", 0: "has shape (2,), expected (4,)", 1: "holds NaN or Inf"}
    assert describe_refusals(refused) == (
        "clients [1, 3]: holds NaN or Inf; clients [0]: has shape (2,), expected (4,)"
    )


def test_a_round_with_every_state_refused_stops_and_says_why() -> None:
    """Training that diverges everywhere (every state NaN) stops the run with the guard's reasons in the message."""
    sim = Simulation(make_experiment(**SMOKE))
    for k in range(4):
        _poison(sim, k, lambda g, s: torch.full_like(s, math.nan))
    with pytest.raises(InvalidUpdateError) as err:
        sim.run()
    assert str(err.value) == (
        "round 0: the update guard refused every client state (clients [0, 1, 2, 3]: holds NaN or Inf); "
        "the global model is unchanged"
    )


def test_a_scaling_attack_with_gamma_100_passes_the_default_guard() -> None:
    sim = Simulation(make_experiment(**SMOKE))
    _poison(sim, 3, lambda g, s: g + 100.0 * (s - g))
    assert all(r["invalid"] == {} and r["rejected"] == [] for r in sim.run().records)
