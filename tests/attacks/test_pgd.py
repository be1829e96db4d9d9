"""``pgd`` (ATTACKS.md §A4): the projection by hand, inside the ball after every local step on both engines, the
``auto`` radius (median benign norm of the previous round; round 0: the round's own estimate), its state."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc import make_experiment
from spmc.attacks import ATTACKS, CraftingInputs
from spmc.attacks.pgd import PGD, PGDOptions, median, project_ball, update_norms
from spmc.config import build_attack
from spmc.threat import ThreatModel

from ._training import assert_same, both_engines, simulation, update_norm


def test_registry_and_hooks() -> None:
    assert ATTACKS["pgd"] is PGD and PGD.hooks == {"training", "crafting"}
    assert not PGD.targeted
    plan = build_attack(make_experiment(update_attack="pgd"))
    assert isinstance(plan.update, PGD) and plan.update.options == PGDOptions(None)
    assert plan.training() is not None and plan.crafter() is not None


def test_projection_by_hand() -> None:
    rows = torch.tensor([[3.0, 4.0, 0.0], [0.3, 0.4, 0.0], [0.0, 0.0, 0.0]])
    out = project_ball(rows, torch.zeros(3), 1.0)
    assert torch.allclose(out, torch.tensor([[0.6, 0.8, 0.0], [0.3, 0.4, 0.0], [0.0, 0.0, 0.0]]))
    # around a centre c: c + (θ − c)·ε/‖θ − c‖ = (1,1,1) + (3,4,0)·2/5
    centre = torch.ones(3)
    assert torch.allclose(project_ball(rows[:1] + centre, centre, 2.0), torch.tensor([[2.2, 2.6, 1.0]]))
    # one radius per row
    assert torch.allclose(project_ball(rows[:2], torch.zeros(3), torch.tensor([2.5, 0.25])),
                          torch.tensor([[1.5, 2.0, 0.0], [0.15, 0.2, 0.0]]))  # fmt: skip
    # a masked-out coordinate (an integer counter) is neither measured nor moved
    counted = torch.tensor([[3.0, 4.0, 100.0]])
    mask = torch.tensor([True, True, False])
    assert torch.allclose(project_ball(counted, torch.zeros(3), 1.0, mask), torch.tensor([[0.6, 0.8, 100.0]]))
    assert update_norms(counted, torch.zeros(3), mask).tolist() == [5.0]
    assert median(torch.tensor([4.0, 1.0, 2.0, 10.0])) == 3.0 and median(torch.tensor([4.0, 1.0, 2.0])) == 2.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.floats(-1e3, 1e3), min_size=4, max_size=4), min_size=1, max_size=5),
    st.floats(1e-3, 1e3),
)
def test_projection_lands_in_the_ball_and_keeps_direction(values: list[list[float]], eps: float) -> None:
    rows = torch.tensor(values, dtype=torch.float64)
    centre = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    out = project_ball(rows, centre, eps)
    before, after = (torch.linalg.vector_norm(x - centre, dim=1) for x in (rows, out))
    assert bool((after <= eps * (1 + 1e-9) + 1e-12).all())
    inside = before <= eps
    assert torch.equal(out[inside], rows[inside])
    outside = ~inside
    if bool(outside.any()):  # same direction, on the sphere
        assert torch.allclose(after[outside], torch.full_like(after[outside], eps), rtol=1e-9)
        cos = torch.nn.functional.cosine_similarity(out[outside] - centre, rows[outside] - centre, dim=1)
        assert torch.allclose(cos, torch.ones_like(cos), atol=1e-9)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, True, "1"])
def test_pgd_eps_is_validated(bad: object) -> None:
    with pytest.raises(ValueError, match=r"^pgd_eps: got .*; must be a finite number > 0 or None \(auto\)$"):
        PGDOptions(bad)  # type: ignore[arg-type]


class Recording(PGD):
    """PGD that records ‖θ − θ_g‖ before and after every projection."""

    def __init__(self, eps: float) -> None:
        super().__init__(options=PGDOptions(eps))
        self.before: list[float] = []
        self.after: list[float] = []

    def project(self, rows: torch.Tensor, global_state: torch.Tensor) -> torch.Tensor:
        out = super().project(rows, global_state)
        self.before += update_norms(rows, global_state).tolist()
        self.after += update_norms(out, global_state).tolist()
        return out


def test_inside_the_ball_after_every_step_on_both_engines() -> None:
    eps = 0.01
    attack = Recording(eps)
    sim = simulation(attack)
    sequential, batched = both_engines(sim, 0)
    assert_same(sequential, batched)
    assert attack.after and max(attack.after) <= eps * (1 + 1e-5)
    assert max(attack.before) > 1.5 * eps  # the ball was binding: the projection acted
    steps = sum(r.steps for r in sequential + batched if r.client_id in sim.data.malicious)
    assert len(attack.after) == steps  # once per local step and attacker, on both engines
    for r in sequential:
        norm = update_norm(r.state, sim.global_state)
        assert (norm <= eps * (1 + 1e-5)) == (r.client_id in sim.data.malicious), (r.client_id, norm)


def inputs(t: int, attackers: list[list[float]], benign: list[list[float]], **extra: torch.Tensor) -> CraftingInputs:
    a, b = torch.tensor(attackers), torch.tensor(benign).reshape(-1, 2)
    return CraftingInputs(t, torch.zeros(2), a, tuple(range(len(a))), b, tuple(range(len(b))), **extra)


def test_auto_radius_by_hand() -> None:
    attack = PGD(threat=ThreatModel(num_clients=6, gamma=0.5))
    assert attack.eps is None and attack.project(torch.ones(1, 2), torch.zeros(2)).tolist() == [[1.0, 1.0]]
    # round 0: benign norms 1, 2, 4 → median 2; the attacker (norm 10) is projected onto it and ε = 2 is learned
    out = attack.craft(inputs(0, [[6.0, 8.0]], [[1.0, 0.0], [0.0, 2.0], [4.0, 0.0]]))
    assert torch.allclose(out, torch.tensor([[1.2, 1.6]])) and attack.eps == 2.0
    assert torch.allclose(attack.project(torch.tensor([[6.0, 8.0]]), torch.zeros(2)), torch.tensor([[1.2, 1.6]]))
    # round 1 uses the previous round's ε = 2, then learns this round's median 5
    out = attack.craft(inputs(1, [[6.0, 8.0]], [[3.0, 4.0], [0.0, 5.0]]))
    assert torch.allclose(out, torch.tensor([[1.2, 1.6]])) and attack.eps == 5.0
    # a configured ε wins and is never overwritten
    fixed = PGD(options=PGDOptions(1.0))
    assert torch.allclose(fixed.craft(inputs(0, [[6.0, 8.0]], [[30.0, 40.0]])), torch.tensor([[0.6, 0.8]]))
    assert fixed.eps == 1.0 and fixed.state_dict() == {}


def test_auto_radius_from_clean_models_under_partial_knowledge() -> None:
    attack = PGD()
    clean = torch.tensor([[0.0, 1.0], [0.0, 3.0]])  # the attackers' own clean updates: norms 1 and 3
    out = attack.craft(inputs(0, [[6.0, 8.0], [0.0, 1.0]], [], clean_states=clean))
    assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))  # each onto its own clean norm
    assert attack.eps == 2.0  # the pooled clean median for the next round
    # with neither benign states nor clean models nothing is known: the states pass unchanged
    blind = PGD()
    assert blind.craft(inputs(0, [[6.0, 8.0]], [])).tolist() == [[6.0, 8.0]] and blind.eps is None


def test_state_round_trip_and_hostile_state() -> None:
    attack = PGD()
    attack.craft(inputs(0, [[6.0, 8.0]], [[1.0, 0.0]]))
    restored = PGD()
    restored.load_state_dict(attack.state_dict())
    assert restored.eps == attack.eps == 1.0
    for bad in ({"eps": torch.tensor(-1.0)}, {"eps": torch.tensor([1.0, 2.0])}, {"eps": 3}, {"other": torch.ones(1)}):
        with pytest.raises(ValueError, match="attack 'pgd'"):
            PGD().load_state_dict(bad)  # type: ignore[arg-type]


def test_pgd_bounds_the_attackers_in_a_run() -> None:
    """Effect on a run: under ``auto`` the attackers' round-1 updates are no longer than the median benign update
    of round 0, while without the attack they are longer; the global model differs."""
    runs = {}
    for name in ("none", "pgd"):
        sim = simulation(ATTACKS[name]() if name == "pgd" else None, lr=0.05)
        norms: dict[int, list[float]] = {}
        for t in range(2):
            ids = sim.participants(t)
            sim.federation.prepare_round(t, sim.global_state, ids)
            start = sim.global_state.clone()
            results = sim.engine.train_round(start, sim.tasks(t, ids))
            outcome = sim.core.step(t, [r.state for r in results], ids, [1.0] * len(ids))
            assert outcome.states is not None
            norms[t] = [update_norm(s, start) for s in outcome.states]
        runs[name] = (norms, sim.global_state.clone())
    benign_median_0 = median(torch.tensor(runs["pgd"][0][0][:2]))
    assert max(runs["pgd"][0][1][2:]) <= benign_median_0 * (1 + 1e-5)
    assert max(runs["none"][0][1][2:]) > benign_median_0 * 1.05
    assert not torch.allclose(runs["none"][1], runs["pgd"][1])


def test_auto_radius_under_partial_knowledge_in_a_run() -> None:
    """Under ``partial`` the crafting step sees the attackers' clean models only: round 0 projects each attacker
    onto its own clean update norm, and ε is learned from them."""
    seen: list[CraftingInputs] = []

    class Spy(PGD):
        def craft(self, inputs: CraftingInputs) -> torch.Tensor:
            seen.append(inputs)
            out = super().craft(inputs)
            assert inputs.clean_states is not None
            own = update_norms(inputs.clean_states, inputs.global_state)
            assert bool((update_norms(out, inputs.global_state) <= own * (1 + 1e-5)).all())
            return out

    attack = Spy()
    sim = simulation(attack, attacker_knowledge="partial")
    sim.run_round(0)
    (inputs,) = seen
    assert inputs.benign_ids == () and attack.eps == pytest.approx(
        median(update_norms(inputs.clean_states, inputs.global_state))
    )  # type: ignore[arg-type]
