"""``coalition_mimic`` (ATTACKS.md §A5): θ̃ = T_k + s·(θ_bd − T_k), the largest s ≤ Γ with cos(θ̃, T_k) ≥
cos(θ_c, T_k). By hand, the constraint for every state sent (property), the bisection against a brute-force grid,
the teachers the server hands the crafting step (θ_g when it sends none), knowledge (never a benign state), both
engines, an SPMC run (the attackers' scores), Flower (equal to the engine), CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc import make_experiment
from spmc.attacks import ATTACKS, Crafter, CraftingInputs
from spmc.attacks.coalition_mimic import CoalitionMimic, cosine_to, mimic
from spmc.attacks.crafting import to_states
from spmc.attacks.scaling import SCALE_FACTOR_HELP, ScalingOptions
from spmc.cli import main
from spmc.config import build_attack
from spmc.options import option_specs
from spmc.simulation import Simulation
from spmc.threat import ThreatModel

from ._training import assert_same, both_engines, simulation

SPMC_RUN = {"client": "spmc", "defense": "spmc", "spmc_local_epochs": 1}


def test_registry_options_and_hooks() -> None:
    assert ATTACKS["coalition_mimic"] is CoalitionMimic
    assert CoalitionMimic.carries_backdoor and CoalitionMimic.needs_clean and CoalitionMimic.client_procedure == "plain"
    (spec,) = option_specs(CoalitionMimic.options_type)  # scaling's declaration of scale_factor, reused
    assert (spec.key, spec.default, spec.help) == ("scale_factor", None, SCALE_FACTOR_HELP)
    plan = build_attack(make_experiment(update_attack="coalition_mimic", scale_factor=2.5))
    assert isinstance(plan.update, CoalitionMimic) and plan.update.gamma == 2.5
    assert plan.crafter() is not None and plan.training() is None
    assert CoalitionMimic(threat=ThreatModel(num_clients=10, gamma=0.3)).gamma == pytest.approx(10 / 3)  # K/m
    with pytest.raises(ValueError, match="scale_factor"):
        make_experiment(update_attack="coalition_mimic", scale_factor=-1.0)


def inputs(
    backdoor: list[list[float]],
    clean: list[list[float]] | None,
    teachers: list[list[float]] | None,
    benign: list[list[float]] | None = None,
    g: list[float] | None = None,
) -> CraftingInputs:
    bd = torch.tensor(backdoor, dtype=torch.float64)
    d = bd.shape[1]
    b = torch.tensor(benign, dtype=torch.float64) if benign else torch.zeros(0, d, dtype=torch.float64)
    return CraftingInputs(
        round=1,
        global_state=torch.tensor(g if g is not None else [1.0] + [0.0] * (d - 1), dtype=torch.float64),
        attacker_states=bd,
        attacker_ids=tuple(range(len(bd))),
        benign_states=b,
        benign_ids=tuple(range(10, 10 + len(b))),
        clean_states=None if clean is None else torch.tensor(clean, dtype=torch.float64),
        teachers=None if teachers is None else torch.tensor(teachers, dtype=torch.float64),
    )


def test_by_hand() -> None:
    """T = (1, 0), θ_bd = (1, 1): θ̃ = (1, s), cos = 1/√(1 + s²); θ_c = (1, ½) scores 1/√1.25, so s* = ½."""
    attack = CoalitionMimic(options=ScalingOptions(3.0))
    out = attack.craft(inputs([[1.0, 1.0]], [[1.0, 0.5]], [[1.0, 0.0]]))
    assert attack.last_scales is not None and float(attack.last_scales[0]) == pytest.approx(0.5, abs=3 * 2**-30)
    assert torch.allclose(out, torch.tensor([[1.0, 0.5]], dtype=torch.float64), atol=1e-8)
    # Γ = ¼ is feasible: s = Γ exactly
    small = CoalitionMimic(options=ScalingOptions(0.25))
    assert small.craft(inputs([[1.0, 1.0]], [[1.0, 0.5]], [[1.0, 0.0]])).tolist() == [[1.0, 0.25]]
    # a backdoor along the teacher (cos = 1 for every s): s = Γ, θ̃ = T + Γ(θ_bd − T) = (1 + 3·1, 0)
    assert attack.craft(inputs([[2.0, 0.0]], [[1.0, 0.5]], [[1.0, 0.0]])).tolist() == [[4.0, 0.0]]
    # two attackers, each against its own teacher and clean model; T₂ = (0, 2), θ_bd = (2, 2), θ_c = (1, 2) → s = ½
    out = attack.craft(inputs([[1.0, 1.0], [2.0, 2.0]], [[1.0, 0.5], [1.0, 2.0]], [[1.0, 0.0], [0.0, 2.0]]))
    assert torch.allclose(out, torch.tensor([[1.0, 0.5], [1.0, 2.0]], dtype=torch.float64), atol=1e-8)
    # a clean model equal to the teacher (target cos = 1): only s where 1 − s²/2 rounds to 1 in float64 pass (s ≲ 1e-8),
    # so the attacker sends (almost) its teacher
    out = attack.craft(inputs([[1.0, 1.0]], [[1.0, 0.0]], [[1.0, 0.0]]))
    assert attack.last_scales is not None and 0 <= float(attack.last_scales[0]) < 1e-7
    assert torch.allclose(out, torch.tensor([[1.0, 0.0]], dtype=torch.float64), atol=1e-7)
    # a target no s can meet (above cos(T, T) = 1 as computed): s = 0, the teacher itself
    crafted, scales = mimic(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([1.5]), 3.0)
    assert scales.tolist() == [0.0] and crafted.tolist() == [[1.0, 0.0]]


def test_fallbacks() -> None:
    attack = CoalitionMimic(options=ScalingOptions(3.0))
    # no teachers (the server sends none): T = θ_g = (1, 0), as by hand
    assert torch.allclose(attack.craft(inputs([[1.0, 1.0]], [[1.0, 0.5]], None)), torch.tensor([[1.0, 0.5]]).double())
    # no clean model: the median benign cosine to T (benign cos 1/√1.25, 1/√2, 1 → median 1/√1.25) → s = ½
    out = attack.craft(inputs([[1.0, 1.0]], None, [[1.0, 0.0]], benign=[[1.0, 0.5], [1.0, 1.0], [1.0, 0.0]]))
    assert torch.allclose(out, torch.tensor([[1.0, 0.5]], dtype=torch.float64), atol=1e-8)
    # neither: the backdoored state unscaled (s = min(1, Γ))
    assert attack.craft(inputs([[1.0, 1.0]], None, [[1.0, 0.0]])).tolist() == [[1.0, 1.0]]
    # the crafter fills θ_g for an attacker the server holds no teacher for, and gives None without teachers
    seen: list[CraftingInputs] = []

    class Spy(CoalitionMimic):
        def craft(self, inputs: CraftingInputs) -> torch.Tensor:
            seen.append(inputs)
            return super().craft(inputs)

    crafter = Crafter(Spy(), frozenset({1, 2}))
    g, states = torch.zeros(3), [torch.ones(3) * k for k in range(3)]
    crafter(0, g, states, [0, 1, 2], {1: torch.ones(3), 2: torch.ones(3)}, {1: torch.full((3,), 7.0)})
    crafter(0, g, states, [0, 1, 2], {1: torch.ones(3), 2: torch.ones(3)})
    assert seen[0].teachers is not None and seen[0].teachers.tolist() == [[7.0] * 3, [0.0] * 3]
    assert seen[1].teachers is None


def _rows(draw: st.DrawFn, m: int, d: int) -> torch.Tensor:
    values = draw(st.lists(st.floats(-10, 10, width=32), min_size=m * d, max_size=m * d))
    return torch.tensor(values, dtype=torch.float32).reshape(m, d)


@st.composite
def cases(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    m, d = draw(st.integers(1, 3)), draw(st.integers(2, 6))
    return _rows(draw, m, d), _rows(draw, m, d), _rows(draw, m, d), draw(st.floats(0.01, 50))


@settings(max_examples=150, deadline=None)
@given(cases())
def test_every_state_sent_keeps_the_constraint(case: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]) -> None:
    """Property over random float32 inputs: each sent row is T + s·(θ_bd − T) (cast) with 0 ≤ s ≤ Γ, and
    cos(θ̃, T) ≥ cos(θ_c, T) holds exactly on it, or s = 0 and it is T itself."""
    teachers, backdoor, clean, gamma = case
    attack = CoalitionMimic(options=ScalingOptions(gamma))
    g = torch.zeros(teachers.shape[1])
    sent = attack.craft(CraftingInputs(0, g, backdoor, (0,), g.new_zeros(0, g.numel()), (), clean, teachers))
    s = attack.last_scales
    assert s is not None and sent.dtype == torch.float32 and sent.shape == backdoor.shape
    assert bool(((s >= 0) & (s <= gamma)).all())
    t64 = teachers.double()
    assert torch.equal(sent, to_states(t64 + s.unsqueeze(1) * (backdoor.double() - t64), backdoor))
    ok = cosine_to(sent, teachers) >= cosine_to(clean, teachers)
    assert bool((ok | ((s == 0) & (sent == teachers).all(dim=1))).all())


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.1, 20))
def test_bisection_against_a_brute_force_grid(seed: int, gamma: float) -> None:
    """The largest feasible point of a 20001-point grid on [0, Γ] and the bisection's s agree to the grid's
    resolution (the feasible set is an interval [0, s*])."""
    gen = torch.Generator().manual_seed(seed)
    m, d = 3, 8
    teachers = torch.randn(m, d, generator=gen, dtype=torch.float64) + 2.0
    backdoor = teachers + torch.randn(m, d, generator=gen, dtype=torch.float64)
    clean = teachers + 0.3 * torch.randn(m, d, generator=gen, dtype=torch.float64)
    target = cosine_to(clean, teachers)
    _, s = mimic(teachers, backdoor, target, gamma)
    grid = torch.linspace(0, gamma, 20001, dtype=torch.float64)
    for i in range(m):
        cand = teachers[i] + grid[:, None] * (backdoor[i] - teachers[i])
        feasible = cosine_to(cand, teachers[i]) >= target[i]
        assert bool(feasible[0])
        best = float(grid[feasible].max())
        assert abs(float(s[i]) - best) <= gamma / 20000 + 1e-9, (i, float(s[i]), best)
        if float(s[i]) < gamma:  # maximal: just above s the constraint fails
            above = teachers[i] + (float(s[i]) + gamma * 1e-6) * (backdoor[i] - teachers[i])
            assert float(cosine_to(above[None], teachers[i])) < float(target[i])


def test_never_reads_benign_states_and_knowledge_changes_nothing() -> None:
    gen = torch.Generator().manual_seed(0)
    states = [torch.randn(5, generator=gen) + 3 for _ in range(4)]
    clean = {2: states[2] + 0.1, 3: states[3] - 0.1}
    teachers = {k: torch.randn(5, generator=gen) + 3 for k in range(4)}
    g = torch.full((5,), 3.0)
    outs = {}
    for knowledge in ("full", "partial"):
        crafter = Crafter(CoalitionMimic(options=ScalingOptions(3.0)), frozenset({2, 3}), knowledge=knowledge)
        outs[knowledge] = crafter(1, g, states, [0, 1, 2, 3], clean, teachers)
        poisoned = [torch.full((5,), float("nan")), torch.full((5,), 1e30)] + states[2:]
        assert all(torch.equal(a, b) for a, b in zip(crafter(1, g, poisoned, [0, 1, 2, 3], clean, teachers)[2:],
                                                     outs[knowledge][2:]))  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(outs["full"], outs["partial"]))
    assert not torch.equal(outs["full"][2], states[2])  # it did craft


class Spy(CoalitionMimic):
    """Records what it was shown and what it sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[CraftingInputs, torch.Tensor]] = []

    def craft(self, inputs: CraftingInputs) -> torch.Tensor:
        out = super().craft(inputs)
        self.seen.append((inputs, out))
        return out


def test_the_server_hands_over_the_teachers_it_sends() -> None:
    """With the SPMC client the crafting step sees each attacker's teacher of the round (θ⁰ in round 0, then the
    α-weighted marginal coalition); with the plain client (no teachers sent) none, so T = θ_g."""
    attack = Spy(options=ScalingOptions(3.0))
    sim = simulation(attack, **SPMC_RUN)
    assert [sim.method_for(k) for k in range(4)] == ["spmc", "spmc", "plain", "plain"]
    sent: dict[int, dict[int, torch.Tensor]] = {}
    for t in range(2):
        sent[t] = {k: sim.teachers[k].clone() for k in (2, 3)}
        record = sim.run_round(t)
        assert record["accepted"] == [0, 1, 2, 3]
    for t, (inputs, out) in enumerate(attack.seen):
        assert inputs.teachers is not None and inputs.clean_states is not None
        assert torch.equal(inputs.teachers, torch.stack([sent[t][2], sent[t][3]]))
        mask = attack.param_mask(out.device)
        ok = cosine_to(out, inputs.teachers, mask) >= cosine_to(inputs.clean_states, inputs.teachers, mask)
        assert bool(ok.all()), t
    assert torch.equal(attack.seen[0][0].teachers, sim.federation.initial_state.expand(2, -1))  # type: ignore[arg-type]
    assert not torch.equal(attack.seen[1][0].teachers, attack.seen[0][0].teachers)  # type: ignore[arg-type]
    plain = Spy(options=ScalingOptions(3.0))
    sim = simulation(plain, defense="spmc")
    sim.run_round(0)
    assert plain.seen[0][0].teachers is None


def test_both_engines_agree() -> None:
    sim = simulation(CoalitionMimic(options=ScalingOptions(3.0)), **SPMC_RUN)
    sequential, batched = both_engines(sim, 0)
    assert_same(sequential, batched)


def spmc_scores(update_attack: str, **extra: Any) -> tuple[float, float, Simulation]:
    """Mean SPMC score of the benign clients and of the attackers over the rounds of a small run."""
    sim = Simulation(make_experiment(**{**SMALL_RUN, "update_attack": update_attack, **extra}))
    records = [sim.run_round(t) for t in range(sim.cfg.rounds)]
    benign = [r["scores"][str(k)] for r in records for k in (0, 1)]
    bad = [r["scores"][str(k)] for r in records for k in (2, 3)]
    return sum(benign) / len(benign), sum(bad) / len(bad), sim


SMALL_RUN: dict[str, Any] = {
    "dataset": "synthetic",
    "synthetic_train_size": 400,
    "synthetic_test_size": 50,
    "batch_size": 16,
    "num_clients": 4,
    "gamma": 0.5,
    "rounds": 3,
    "baseline_local_epochs": 1,
    "spmc_local_epochs": 1,
    "lr": 0.05,
    "device": "cpu",
    "engine": "batched",
    "kernel": "torch",
    "threads": 1,
    "attack": "badnets",
    **SPMC_RUN,
}


def test_attackers_score_like_benign_clients_in_an_spmc_run() -> None:
    """Effect on a run: against SPMC, the attackers' mean score relative to the benign clients' (gap = benign −
    attackers) is better with coalition_mimic than with spmc_skip (the same plain-SGD backdoor, sent unscaled):
    here the mimic shrinks θ_bd towards T_k (s ≈ 0.2-0.5) and its attackers score above the benign mean (measured
    on this run: gap 1.5e-6 for spmc_skip, −6.9e-5 for coalition_mimic), and the run differs."""
    benign_skip, bad_skip, skip = spmc_scores("spmc_skip")
    benign_mimic, bad_mimic, mimic_run = spmc_scores("coalition_mimic")
    gap_skip, gap_mimic = benign_skip - bad_skip, benign_mimic - bad_mimic
    assert gap_mimic < gap_skip and gap_mimic <= 0
    assert not torch.equal(skip.global_state, mimic_run.global_state)


TINY = ["rounds=1", "synthetic_train_size=200", "batch_size=16", "synthetic_test_size=50", "threads=1", "device=cpu"]


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "run"
    sets = ["client=spmc", "defense=spmc", "update_attack=coalition_mimic", "scale_factor=2.0"]
    args = [a for p in (*TINY, *sets) for a in ("--set", p)]
    assert main(["run", "-p", "smoke", *args, "--out", str(out), "-q"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["update_attack"], config["scale_factor"]) == ("coalition_mimic", 2.0)
    assert json.loads((out / "summary.json").read_text())["attack_kind"] == "backdoor"
