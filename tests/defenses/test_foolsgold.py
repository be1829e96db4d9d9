"""FoolsGold (spec §6.8, D24): the repo's weighting steps, history per client id, checkpoints, fallbacks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from spmc.config import build_as
from spmc.defenses.base import RoundInputs
from spmc.defenses.foolsgold import FoolsGold, FoolsGoldOptions, foolsgold_weights
from spmc.params import ParamLayout


def bn_layout() -> ParamLayout:
    return ParamLayout.from_module(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))


def inputs_for(layout: ParamLayout, g: torch.Tensor, states: torch.Tensor, ids: list[int], t: int = 0) -> RoundInputs:
    counts = torch.full((len(ids),), 10.0, dtype=torch.float64)
    return RoundInputs(g, states, tuple(ids), counts, layout, t)


def repo_weights(summed: np.ndarray) -> np.ndarray:
    """A line-by-line transcription of the reference code's ``fools_gold_weight`` (sklearn's cosine by hand)."""
    n = len(summed)
    norms = np.linalg.norm(summed, axis=1, keepdims=True)
    unit = summed / np.where(norms == 0, 1, norms)
    cs = unit @ unit.T - np.eye(n)
    maxcs = np.max(cs, axis=1) + 1e-5
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            if maxcs[i] < maxcs[j]:
                cs[i][j] = cs[i][j] * maxcs[i] / maxcs[j]
    wv = 1 - (np.max(cs, axis=1))
    wv[wv > 1] = 1
    wv[wv < 0] = 0
    wv = wv / np.max(wv)
    wv[(wv == 1)] = 0.99
    wv = np.log((wv / (1 - wv)) + 1e-5) + 0.5
    wv[(np.isinf(wv) + wv > 1)] = 1
    wv[(wv < 0)] = 0
    return wv


def test_sybils_get_zero_weight_hand_example() -> None:
    # Histories e1, e1, e2: the two sybils have cs = 1 with each other → w = 0; the honest client gets logit 1.
    h = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    w = foolsgold_weights(h)
    assert w.tolist() == [0.0, 0.0, 1.0]
    # Logit by hand for a partial similarity: cos = 0.6 between clients 0 and 1, client 2 orthogonal to both.
    h = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    w = foolsgold_weights(h)
    raw = 0.4 / 1.0  # 1 − 0.6, rescaled by max w = 1 (client 2); client 2 → 0.99
    expected_01 = math.log(raw / (1 - raw) + 1e-5) + 0.5
    assert w.tolist() == pytest.approx([expected_01, expected_01, 1.0], abs=1e-12)
    assert foolsgold_weights(h, kappa=0.5).tolist() == pytest.approx([0.5 * expected_01] * 2 + [1.0], abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_the_reference_weighting_over_two_rounds(seed: int) -> None:
    layout = bn_layout()
    params = layout.param_mask()
    rng = np.random.default_rng(seed)
    n = 6
    base = rng.normal(size=int(params.sum()))
    fg = FoolsGold()
    summed = np.zeros((n, int(params.sum())))
    g = torch.tensor(rng.normal(size=layout.dim), dtype=torch.float32)
    for t in range(2):
        # clients 4 and 5 push the same direction (sybils); the others are noisy around a common direction
        deltas = rng.normal(size=(n, int(params.sum()))) + 0.5 * base
        deltas[5] = deltas[4] * 1.5 + 0.01 * rng.normal(size=deltas.shape[1])
        states = g.repeat(n, 1)
        states[:, params] = g[params] + torch.tensor(deltas, dtype=torch.float32)
        states[:, ~params] = torch.tensor(rng.normal(size=(n, int((~params).sum()))), dtype=torch.float32)
        out = fg.aggregate(inputs_for(layout, g, states, list(range(n)), t))
        d32 = (states[:, params] - g[params]).double().numpy()
        summed += d32 / (np.linalg.norm(d32, axis=1, keepdims=True) + 0.1)
        wv = repo_weights(summed)
        freq = wv / wv.sum()
        assert out.weights is not None
        assert np.allclose(out.weights.numpy(), freq, atol=1e-6)
        assert torch.allclose(out.global_state, torch.tensor(freq, dtype=torch.float32) @ states, atol=1e-5)
        g = out.global_state
    assert out.weights[4] < 0.05 and out.weights[5] < 0.05


def test_history_is_keyed_by_id_across_rounds_in_any_order() -> None:
    layout = bn_layout()
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(layout.dim, generator=gen)
    rounds = [g + torch.randn(5, layout.dim, generator=gen) for _ in range(2)]
    ids = [3, 7, 11, 20, 21]
    a, b = FoolsGold(), FoolsGold()
    out_a = [a.aggregate(inputs_for(layout, g, s, ids, t)) for t, s in enumerate(rounds)]
    perms = [torch.tensor([4, 2, 0, 1, 3]), torch.tensor([1, 3, 4, 0, 2])]
    out_b = [
        b.aggregate(inputs_for(layout, g, s[p], [ids[i] for i in p], t)) for t, (s, p) in enumerate(zip(rounds, perms))
    ]
    for oa, ob in zip(out_a, out_b):
        assert torch.allclose(oa.global_state, ob.global_state, atol=1e-6)
        assert oa.diagnostics["weights"] == pytest.approx(ob.diagnostics["weights"], abs=1e-9)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == ids and list(sb) == ids
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in ids)


def test_new_client_starts_with_its_current_update_and_state_round_trip() -> None:
    layout = bn_layout()
    params = layout.param_mask()
    gen = torch.Generator().manual_seed(6)
    g = torch.randn(layout.dim, generator=gen)
    r0 = g + torch.randn(3, layout.dim, generator=gen)
    r1 = g + torch.randn(4, layout.dim, generator=gen)
    fg = FoolsGold()
    fg.aggregate(inputs_for(layout, g, r0, [0, 1, 2], 0))
    saved = fg.state_dict()
    out = fg.aggregate(inputs_for(layout, g, r1, [0, 1, 2, 9], 1))
    d9 = r1[3, params] - g[params]
    assert torch.allclose(fg.history[9], d9 / (d9.double().norm() + 0.1).float(), atol=1e-7)
    d0 = r0[0, params] - g[params]
    d0b = r1[0, params] - g[params]
    assert torch.allclose(
        fg.history[0], d0 / (d0.double().norm() + 0.1).float() + d0b / (d0b.double().norm() + 0.1).float(), atol=1e-6
    )
    restored = FoolsGold()
    restored.load_state_dict({str(k): v for k, v in saved.items()})
    again = restored.aggregate(inputs_for(layout, g, r1, [0, 1, 2, 9], 1))
    assert torch.equal(out.global_state, again.global_state)
    fresh = FoolsGold().aggregate(inputs_for(layout, g, r1, [0, 1, 2, 9], 1))
    assert not torch.allclose(fresh.weights, out.weights)  # the history matters
    with pytest.raises(ValueError, match="1-D tensor"):
        restored.load_state_dict({0: torch.zeros(2, 2)})
    restored.load_state_dict({0: torch.zeros(3)})
    with pytest.raises(ValueError, match="another model"):
        restored.aggregate(inputs_for(layout, g, r1, [0, 1, 2, 9], 2))


def test_uniform_fallback_when_every_client_has_a_twin() -> None:
    layout = ParamLayout.from_module(nn.Linear(2, 1))
    g = torch.zeros(3)
    states = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])  # max w = 0 → the repo divides 0 by 0
    out = FoolsGold().aggregate(inputs_for(layout, g, states, [0, 1]))
    assert out.weights.tolist() == [0.5, 0.5]
    assert out.diagnostics["uniform_fallback"] is True
    assert torch.allclose(out.global_state, states.mean(0))


def test_unnormalised_weights_add_the_weighted_sum_of_updates() -> None:
    layout = bn_layout()
    params = layout.param_mask()
    g = torch.zeros(layout.dim)
    states = torch.zeros(3, layout.dim)
    states[:, params] = torch.eye(3).repeat(1, 4)[:, : int(params.sum())]  # orthogonal updates → w = (1, 1, 1)
    states[:, ~params] = torch.tensor([[1.0], [2.0], [6.0]])
    out = FoolsGold(FoolsGoldOptions(normalize_weights=False)).aggregate(inputs_for(layout, g, states, [0, 1, 2]))
    assert out.diagnostics["logit_weights"] == {"0": 1.0, "1": 1.0, "2": 1.0}
    assert torch.allclose(out.global_state[params], states[:, params].sum(0))  # Σ w_k Δ_k, not the mean
    assert torch.allclose(out.global_state[~params], torch.full((int((~params).sum()),), 3.0))
    normalised = FoolsGold().aggregate(inputs_for(layout, g, states, [0, 1, 2]))
    assert torch.allclose(normalised.global_state, states.mean(0))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 7))
def test_weights_non_negative_summing_to_one(seed: int, n: int) -> None:
    layout = bn_layout()
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(layout.dim, generator=gen)
    fg = FoolsGold()
    for t in range(2):
        states = g + torch.randn(n, layout.dim, generator=gen) * torch.rand(n, 1, generator=gen)
        out = fg.aggregate(inputs_for(layout, g, states, list(range(n)), t))
        assert out.weights is not None and bool((out.weights >= 0).all())
        assert float(out.weights.sum()) == pytest.approx(1.0, abs=1e-12)
        assert set(out.accepted) == {k for k, w in zip(range(n), out.weights.tolist()) if w > 0}


def test_from_config_and_validation() -> None:
    from spmc.config import Experiment

    fg = build_as(
        "foolsgold", Experiment(foolsgold_norm_eps=0.5, foolsgold_kappa=2.0, foolsgold_normalize_weights=False)
    )
    assert (fg.options.norm_eps, fg.options.kappa, fg.options.normalize_weights) == (0.5, 2.0, False)
    with pytest.raises(ValueError, match="foolsgold_norm_eps"):
        FoolsGold(FoolsGoldOptions(norm_eps=-0.1))
    with pytest.raises(ValueError, match="foolsgold_kappa"):
        FoolsGold(FoolsGoldOptions(kappa=0.0))
