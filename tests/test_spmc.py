"""SPMC formulas (spec §3-§4): scores and weights against a naive construction, teachers, projection."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc.defenses import SPMC, RoundInputs, SPMCOptions, loo_cosine_scores, marginal_teachers, spmc_weights
from spmc.models import SimpleCNN
from spmc.params import ParamLayout
from spmc.purify import distillation_loss, project_conflicting
from tests.defenses._helpers import make_inputs


def naive_scores(a: torch.Tensor, prior: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Build every leave-one-out coalition explicitly (spec §3.2 steps 1-2)."""
    a = a.to(torch.float64)
    n = a.shape[0]
    w = torch.full((n,), 1.0 / n, dtype=torch.float64) if prior is None else prior.to(torch.float64)
    out = []
    for k in range(n):
        others = [j for j in range(n) if j != k]
        b = sum(w[j] * a[j] for j in others) / sum(w[j] for j in others)
        out.append(float(a[k] @ b / (a[k].norm() * b.norm() + eps)))
    return torch.tensor(out, dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 9), d=st.integers(1, 40), seed=st.integers(0, 10_000), offset=st.floats(-3, 3))
def test_loo_scores_equal_naive_construction(n: int, d: int, seed: int, offset: float) -> None:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64) + offset
    assert torch.allclose(loo_cosine_scores(a), naive_scores(a), atol=1e-9, rtol=0)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 7), seed=st.integers(0, 10_000))
def test_loo_scores_with_sample_prior_equal_naive(n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 17, generator=g, dtype=torch.float64)
    prior = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    assert torch.allclose(loo_cosine_scores(a, prior), naive_scores(a, prior), atol=1e-9, rtol=0)


def test_loo_scores_hand_computed() -> None:
    # a = e1, e1, e2: LOO of client 0 is e1·... b_0 = (e1 + e2)/2 → cos = (1/2)/(1·√(1/2)) = 1/√2.
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    s = loo_cosine_scores(a, eps=0.0)
    assert s.tolist() == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2), 0.0], abs=1e-12)


def test_loo_scores_float64_resolve_tiny_differences() -> None:
    # Near-identical float32 states (cosines ≈ 1): the float64 accumulation must still match the naive result.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 92_626, generator=g)
    scale = 1e-3 * torch.arange(1, 11, dtype=torch.float32)[:, None]
    a = base + scale * torch.randn(10, 92_626, generator=g)
    s = loo_cosine_scores(a)
    ref = naive_scores(a.double())
    assert torch.allclose(s, ref, atol=1e-9, rtol=0)
    assert bool((s.diff() < 0).all())  # the further a client strays, the lower its score, even at cos ≈ 1


def test_edge_cases_n1_n2_and_zero_vectors() -> None:
    assert loo_cosine_scores(torch.randn(1, 5)).tolist() == [0.0]
    a = torch.tensor([[1.0, 2.0], [2.0, 4.0]])
    assert loo_cosine_scores(a).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)  # n=2: the other model
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    s = loo_cosine_scores(z)
    assert s[0] == 0.0 and torch.isfinite(s).all()


def _hostile_rows(draw_seed: int, n: int, d: int, scales: list[float], dtype: torch.dtype) -> torch.Tensor:
    """Random rows, each multiplied by its own scale; some rows equal, one zero when the seed says so."""
    g = torch.Generator().manual_seed(draw_seed)
    a = (torch.randn(n, d, generator=g, dtype=torch.float64) + 0.5) * torch.tensor(scales, dtype=torch.float64)[:, None]
    if draw_seed % 3 == 0:
        a[-1] = a[0]
    if draw_seed % 5 == 0:
        a[1] = 0.0
    return a.to(dtype)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n=st.integers(2, 7),
    d=st.integers(1, 30),
    seed=st.integers(0, 10_000),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_loo_scores_equal_naive_construction_at_any_scale(
    data: st.DataObject, n: int, d: int, seed: int, dtype: torch.dtype
) -> None:
    # Issue 11: one client ×1e8 gave a score error of 2e-2, ×1e9 a "cosine" of 2.8e16. Every row gets its own scale
    # in 1e-30..1e30 (float64) or 1e-18..1e18 (float32); the explicit construction cannot overflow there.
    top = 30 if dtype == torch.float64 else 18
    exps = data.draw(st.lists(st.integers(-top, top), min_size=n, max_size=n))
    a = _hostile_rows(seed, n, d, [10.0**e for e in exps], dtype)
    s = loo_cosine_scores(a)
    assert bool((s.abs() <= 1.0).all())
    assert torch.allclose(s, naive_scores(a), atol=1e-9, rtol=1e-9)


def rescaled_naive_scores(a: torch.Tensor) -> torch.Tensor:
    """The explicit construction with ε = 0, each of a_k and b_k divided by its max |entry| before the cosine."""
    a = a.to(torch.float64)
    out = []
    for k in range(a.shape[0]):
        b = sum(a[j] for j in range(a.shape[0]) if j != k) / (a.shape[0] - 1)
        x, y = a[k] / a[k].abs().max(), b / b.abs().max()
        out.append(float(x @ y / (x.norm() * y.norm())))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scale", [1e300, 1e-300, 1e-320])
def test_loo_scores_extreme_float64_scales(scale: float) -> None:
    # Beyond the range where the explicit construction can square its numbers. At 1e300 ε is negligible; at 1e-300
    # the huge-ε limit gives the small client s = 0 while the others keep their ordinary scores.
    big = _hostile_rows(1, 5, 12, [1.0] * 5, torch.float64)
    big[2] *= scale
    s = loo_cosine_scores(big)
    if scale > 1:
        assert torch.allclose(s, rescaled_naive_scores(big), atol=1e-9, rtol=0)
    else:
        assert s[2] == pytest.approx(0.0, abs=1e-9) and bool(torch.isfinite(s).all())
        assert torch.allclose(s[[0, 1, 3, 4]], naive_scores(big)[[0, 1, 3, 4]], atol=1e-9, rtol=0)


def test_loo_scores_eps_is_absolute_in_the_input_units() -> None:
    # ε = 1e-5 against ‖a‖·‖b‖ = 1e-6·1 must still count, whatever the rescaling does internally.
    a = torch.tensor([[1e-6, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    assert float(loo_cosine_scores(a)[0]) == pytest.approx(1e-6 / (1e-6 + 1e-5), rel=1e-12)
    assert float(loo_cosine_scores(a, eps=0.0)[0]) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("factor", [1e8, 1e9, 1e18])
def test_one_huge_client_does_not_take_over_spmc(dtype: torch.dtype, factor: float) -> None:
    # Issue 11: a client scaled ×1e9 scored 2.8e16 and got α = 1, i.e. it became the global model.
    g = torch.Generator().manual_seed(3)
    states = (1.0 + 0.05 * torch.randn(6, 3, generator=g, dtype=torch.float64)).to(dtype)
    states[2] = states[2] * factor
    agg = SPMC().aggregate(make_inputs(states))
    assert torch.allclose(agg.weights, torch.softmax(naive_scores(states), 0), atol=1e-9, rtol=0)
    assert float(agg.weights.max()) < 0.5
    assert all(-1.0 <= v <= 1.0 for v in agg.diagnostics["scores"].values())


def test_loo_scores_reject_non_finite_rows_and_bad_priors() -> None:
    a = torch.ones(3, 2)
    a[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        loo_cosine_scores(a)
    with pytest.raises(ValueError, match="prior"):
        loo_cosine_scores(torch.ones(3, 2), torch.tensor([1.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="coalition"):
        loo_cosine_scores(torch.ones(2, 2), torch.tensor([1.0, 0.0]))


def test_softmax_weights_and_temperature() -> None:
    s = torch.tensor([0.9, 0.95, 1.0], dtype=torch.float64)
    w = spmc_weights(s)
    e = torch.exp(s - s.max() + 1e-5)  # the repo's formula (spec §3.2 step 3)
    assert torch.allclose(w, e / e.sum(), atol=1e-15)
    w_cold = spmc_weights(s, temperature=0.01)
    assert w_cold[2] > 0.99 and w_cold.sum() == pytest.approx(1.0)
    assert spmc_weights(s, temperature=1e6).tolist() == pytest.approx([1 / 3] * 3, abs=1e-6)
    with pytest.raises(ValueError, match="spmc_temperature"):
        spmc_weights(s, temperature=0.0)


def test_sigmoid_weights_follow_the_seed_formula() -> None:
    s = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    phi_hat = s.max() - s
    expected = torch.sigmoid(-phi_hat) / torch.sigmoid(-phi_hat).sum()
    assert torch.allclose(spmc_weights(s, fn="sigmoid"), expected)


def _inputs(states: torch.Tensor, layout: ParamLayout, global_state: torch.Tensor | None = None) -> RoundInputs:
    n = states.shape[0]
    g = states.mean(0) if global_state is None else global_state
    return RoundInputs(g, states, tuple(range(n)), torch.full((n,), 100.0), layout, 0)


def test_spmc_defense_aggregates_with_weights_of_naive_scores() -> None:
    model = SimpleCNN()
    layout = ParamLayout.from_module(model)
    g = torch.Generator().manual_seed(1)
    base = layout.flatten(model)
    states = base + 0.05 * torch.randn(6, layout.dim, generator=g)
    states[5] = -states[5]  # an outlier
    agg = SPMC().aggregate(_inputs(states, layout))
    w = torch.softmax(naive_scores(states), 0)
    assert torch.allclose(agg.weights, w, atol=1e-12)
    assert torch.allclose(agg.global_state, (w.float() @ states), atol=1e-5)
    assert int(agg.weights.argmin()) == 5
    assert agg.weights.sum().item() == pytest.approx(1.0)


def test_spmc_single_client() -> None:
    layout = ParamLayout.from_module(SimpleCNN())
    state = torch.randn(1, layout.dim)
    agg = SPMC().aggregate(_inputs(state, layout))
    assert agg.weights.tolist() == [1.0]
    assert torch.equal(agg.global_state, state[0])


def test_spmc_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="spmc_score_ref"):
        SPMC(SPMCOptions(score_ref="nope"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="spmc_score_ref"):
        SPMC(SPMCOptions(score_ref="global", score_space="updates"))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 8), seed=st.integers(0, 10_000))
def test_closed_form_teacher_equals_weighted_leave_one_out(n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(n, 23, generator=g, dtype=torch.float64)
    w = torch.softmax(torch.randn(n, generator=g, dtype=torch.float64), 0)
    global_state = w @ states
    teachers = marginal_teachers(global_state, states, w)
    for k in range(n):
        others = [j for j in range(n) if j != k]
        explicit = sum(w[j] * states[j] for j in others) / sum(w[j] for j in others)
        assert torch.allclose(teachers[k], explicit, atol=1e-10)


def test_teacher_single_client_and_weight_one() -> None:
    states = torch.tensor([[1.0, 2.0]])
    assert torch.equal(marginal_teachers(states[0], states, torch.ones(1)), states)
    states = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = marginal_teachers(states[0], states, torch.tensor([1.0, 0.0]))
    assert torch.equal(t[0], states[0]) and torch.equal(t[1], states[0])


def explicit_teachers(states: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_{j≠k} α_j θ_j / Σ_{j≠k} α_j built for every k in float64 (spec §4.1)."""
    s, w = states.to(torch.float64), w.to(torch.float64)
    rows = []
    for k in range(s.shape[0]):
        others = [j for j in range(s.shape[0]) if j != k]
        rows.append(sum(w[j] * s[j] for j in others) / sum(w[j] for j in others))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gap", [1e-3, 1e-6, 1e-9, 1e-12, 1e-15, 1e-30, 1e-300])
def test_teachers_accurate_when_one_weight_nears_one(dtype: torch.dtype, gap: float) -> None:
    # Issue 11: (θ_g − α_k θ_k)/(1 − α_k) had 47-370 % error for 1 − α_k ≈ 1e-3…1e-13 and gave the client's own
    # model at α_k = 1.0 (the others' weights still positive).
    g = torch.Generator().manual_seed(7)
    states = torch.randn(4, 50, generator=g, dtype=torch.float64).to(dtype)
    w = torch.tensor([1.0 - gap, gap / 2, gap / 4, gap / 4], dtype=torch.float64)
    teachers = marginal_teachers(w.to(dtype) @ states, states, w)
    expected = explicit_teachers(states, w)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert torch.allclose(teachers.to(torch.float64), expected, rtol=tol, atol=tol * float(expected.abs().max()))
    assert teachers.dtype == dtype


def test_teachers_when_other_weights_are_zero_and_at_extreme_scales() -> None:
    # The others' weights all exactly 0 (Krum-like selection, α underflow): the teacher is the given global model.
    states = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
    glob = torch.tensor([9.0, 9.0], dtype=torch.float64)
    t = marginal_teachers(glob, states, torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(t[0], glob)
    assert t[1].tolist() == [1.0, 2.0] and t[2].tolist() == [1.0, 2.0]
    huge = torch.tensor([[1e308, -1e308], [1.5e308, 1e-300], [1e308, 1.0]], dtype=torch.float64)
    t = marginal_teachers(torch.zeros(2, dtype=torch.float64), huge, torch.full((3,), 1 / 3, dtype=torch.float64))
    assert bool(torch.isfinite(t).all())
    assert torch.allclose(t, explicit_teachers(huge / 1e300, torch.ones(3)) * 1e300, rtol=1e-12)
    with pytest.raises(ValueError, match="weights"):
        marginal_teachers(glob, states, torch.tensor([0.5, float("nan"), 0.5]))


# ---- client side: projection and distillation loss (spec §4.2-§4.3) ----


def test_projection_unchanged_when_not_conflicting() -> None:
    gd = [torch.tensor([1.0, 2.0]), torch.tensor([[1.0, 0.0]])]
    gg = [torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 5.0]])]  # dot > 0 and dot = 0
    out = project_conflicting(gd, gg)
    assert all(torch.equal(a, b) for a, b in zip(out, gd))


def test_projection_orthogonal_when_conflicting_lambda_one() -> None:
    gd = [torch.tensor([1.0, 1.0])]
    gg = [torch.tensor([-2.0, 0.0])]
    (out,) = project_conflicting(gd, gg, lam=1.0)
    assert out.tolist() == pytest.approx([0.0, 1.0])  # G_d − (−2/4)·G_g
    assert float(out @ gg[0]) == pytest.approx(0.0)


def test_projection_partial_for_lambda_below_one_and_norm_power_one() -> None:
    gd = [torch.tensor([1.0, 1.0])]
    gg = [torch.tensor([-2.0, 0.0])]
    (half,) = project_conflicting(gd, gg, lam=0.5)
    assert half.tolist() == pytest.approx([0.5, 1.0])
    (p1,) = project_conflicting(gd, gg, lam=1.0, norm_power=1.0)  # the seed's ‖G_g‖ normaliser (D5)
    assert p1.tolist() == pytest.approx([1.0 - 2.0 / 2.0 * 2.0 / 2.0 * 2.0, 1.0])


def test_projection_zero_norm_guard() -> None:
    gd = [torch.tensor([1.0, -1.0]), torch.zeros(2)]
    gg = [torch.zeros(2), torch.tensor([-1.0, 0.0])]
    out = project_conflicting(gd, gg)
    assert torch.equal(out[0], gd[0]) and torch.equal(out[1], gd[1])
    assert all(torch.isfinite(o).all() for o in out)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), lam=st.floats(0.0, 1.0))
def test_projection_per_tensor_property(seed: int, lam: float) -> None:
    g = torch.Generator().manual_seed(seed)
    gd = [torch.randn(5, generator=g), torch.randn(3, 2, generator=g)]
    gg = [torch.randn(5, generator=g), torch.randn(3, 2, generator=g)]
    out = project_conflicting(gd, gg, lam=lam)
    for d, gk, o in zip(gd, gg, out):
        dot = float((d * gk).sum())
        if dot >= 0:
            assert torch.equal(o, d)
        else:
            # the conflicting component shrinks by exactly (1 − λ)
            assert float((o * gk).sum()) == pytest.approx((1 - lam) * dot, abs=1e-5)


@pytest.mark.parametrize(("scale_d", "scale_g"), [(1e-25, 1e-25), (1e20, 1e20), (1e-25, 1e20), (1e20, 1e-25)])
def test_projection_float32_at_extreme_scales_matches_float64(scale_d: float, scale_g: float) -> None:
    # Issue 11: float32 dots and norms underflowed below |g| ≈ 1e-20 and overflowed above ≈ 1e18, and the
    # projection was then silently skipped.
    g = torch.Generator().manual_seed(5)
    base = torch.randn(40, generator=g, dtype=torch.float64)
    gd = [base * scale_d, torch.randn(3, 4, generator=g, dtype=torch.float64)]
    gg = [(torch.randn(40, generator=g, dtype=torch.float64) - base) * scale_g, torch.ones(3, 4)]
    gd32, gg32 = [t.float() for t in gd], [t.float() for t in gg]
    out = project_conflicting(gd32, gg32)
    ref = project_conflicting([t.double() for t in gd32], [t.double() for t in gg32])
    assert float((gd32[0].double() * gg32[0].double()).sum()) < 0  # the pair conflicts
    assert out[0].dtype == torch.float32
    assert torch.allclose(out[0].double(), ref[0], rtol=1e-5, atol=1e-5 * float(ref[0].abs().max()))
    assert not torch.allclose(out[0], gd32[0], rtol=1e-3, atol=0)  # it was projected
    assert float((out[0].double() * gg32[0].double()).sum()) == pytest.approx(
        0.0, abs=1e-5 * float(out[0].double().norm() * gg32[0].double().norm())
    )


def test_projection_model_granularity_uses_the_concatenation() -> None:
    gd = [torch.tensor([1.0]), torch.tensor([1.0])]
    gg = [torch.tensor([-1.0]), torch.tensor([3.0])]  # per tensor: conflict then no conflict; overall dot = 2 > 0
    tensor_wise = project_conflicting(gd, gg)
    model_wise = project_conflicting(gd, gg, granularity="model")
    assert tensor_wise[0].tolist() == [0.0] and tensor_wise[1].tolist() == [1.0]
    assert [t.tolist() for t in model_wise] == [[1.0], [1.0]]


def test_distillation_loss_gradient_is_softmax_difference() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 10, generator=g, requires_grad=True)
    zt = torch.randn(4, 10, generator=g)
    loss = distillation_loss(z, zt)
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.allclose(grad, (torch.softmax(z, 1) - torch.softmax(zt, 1)).detach() / 4, atol=1e-7)
    assert distillation_loss(zt, zt) == pytest.approx(
        float(-(torch.softmax(zt, 1) * torch.log_softmax(zt, 1)).sum(1).mean())
    )
