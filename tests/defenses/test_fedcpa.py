"""FedCPA (spec §6.11): against a transcription of the reference code (with the write-back), hand values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from spmc.config import build_as
from spmc.defenses.base import RoundInputs
from spmc.defenses.fedcpa import (
    FedCPA,
    FedCPAOptions,
    critical_mask,
    fedcpa_logit_weights,
    jaccard_matrix,
    pearson_matrix,
    top_bottom_masks,
)
from spmc.params import ParamLayout


def conv_module() -> nn.Module:
    """conv weight (4-D, 8 entries), conv bias, linear weight (2-D, 24 entries), linear bias: no buffers."""
    return nn.Sequential(nn.Conv2d(1, 2, 2), nn.Flatten(), nn.Linear(8, 3))


def bn_layout() -> ParamLayout:
    return ParamLayout.from_module(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))


def inputs_for(layout: ParamLayout, g: torch.Tensor, states: torch.Tensor, ids: list[int]) -> RoundInputs:
    return RoundInputs(g, states, tuple(ids), torch.full((len(ids),), 5.0, dtype=torch.float64), layout, 0)


def repo_fedcpa(global_sd: dict, client_sds: list[dict], top_rate: float) -> tuple[dict, np.ndarray]:
    """The reference ``FedCPA.server_update`` transcribed on state dicts, plus the write-back it omits."""
    n = len(client_sds)
    prev = {k: client_sds[0][k] / n for k in global_sd}
    for sd in client_sds[1:]:
        for k in global_sd:
            prev[k] = prev[k] + sd[k] / n

    def flat(d: dict) -> torch.Tensor:
        return torch.cat([v.reshape(-1).float() for v in d.values()])

    g_crit = flat({k: torch.abs((prev[k] - v) * prev[k]) for k, v in global_sd.items() if v.dim() in (2, 4)})
    g_crit = g_crit.view(1, -1)
    k_top = int(g_crit.shape[1] * top_rate)
    g_top = g_crit.abs().topk(k_top).indices
    g_bot = g_crit.abs().topk(k_top, largest=False).indices
    w = torch.stack(
        [flat({k: torch.abs((v - prev[k]) * v) for k, v in sd.items() if v.dim() in (2, 4)}) for sd in client_sds]
    )
    top = w.abs().topk(k_top).indices
    bot = w.abs().topk(k_top, largest=False).indices

    def sim(a: torch.Tensor, at: torch.Tensor, ab: torch.Tensor, b: torch.Tensor, bt: torch.Tensor, bb: torch.Tensor):
        ti = list(set(at.tolist()) & set(bt.tolist()))
        bi = list(set(ab.tolist()) & set(bb.tolist()))
        tc = (scipy.stats.pearsonr(a[ti].numpy(), b[ti].numpy())[0] + 1) / 2
        tj = len(ti) / (len(at) + len(bt) - len(ti))
        bc = (scipy.stats.pearsonr(a[bi].numpy(), b[bi].numpy())[0] + 1) / 2
        bj = len(bi) / (len(ab) + len(bb) - len(bi))
        return (tc + bc) / 2 + (tj + bj) / 2

    pair = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1):
            pair[i][j] = pair[j][i] = sim(w[i], top[i], bot[i], w[j], top[j], bot[j])
    glob = np.array([sim(w[i], top[i], bot[i], g_crit[0], g_top[0], g_bot[0]) for i in range(n)])
    total = pair.mean(axis=1) + glob
    wv = (total - total.min()) / (total.max() - total.min())
    wv[wv == 1] = 0.99
    wv[wv == 0] = 0.01
    wv = np.log(wv / (1 - wv)) + 0.5
    wv[(np.isinf(wv) + wv > 1)] = 1
    wv[wv < 0] = 0
    kept = [i for i in range(n) if wv[i] != 0]
    new = {k: sum(v + wv[i] * (client_sds[i][k] - v) for i in kept) / len(kept) for k, v in global_sd.items()}
    return new, wv


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_reference_code_with_write_back(seed: int) -> None:
    torch.manual_seed(seed)
    module = conv_module()
    layout = ParamLayout.from_module(module)
    gen = torch.Generator().manual_seed(seed)
    g = layout.flatten(module)
    n = 6
    states = g + 0.1 * torch.randn(n, layout.dim, generator=gen)
    states[4:] = g + 0.5 * torch.randn(2, layout.dim, generator=gen)  # two clients far from the rest
    out = FedCPA(FedCPAOptions(top_rate=0.5)).aggregate(inputs_for(layout, g, states, list(range(n))))
    new_sd, wv = repo_fedcpa(layout.unflatten(g), [layout.unflatten(s) for s in states], 0.5)
    assert np.allclose(list(out.diagnostics["logit_weights"].values()), wv, atol=1e-5)
    assert torch.allclose(out.global_state, layout.flatten_state_dict(new_sd), atol=1e-6)
    assert out.accepted == tuple(i for i in range(n) if wv[i] != 0)
    assert len(out.accepted) < n  # the lowest score always gets v = 0


def test_logit_weights_hand_computed() -> None:
    v, fallback = fedcpa_logit_weights(torch.tensor([3.0, 2.0, 1.0, 2.5]))
    # min-max → 1, .5, 0, .75 → .99, .5, .01, .75 → ln(99)+.5 → 1, 0.5, ln(1/99)+.5 → 0, ln 3 + .5 → 1
    assert v.tolist() == pytest.approx([1.0, 0.5, 0.0, 1.0], abs=1e-12)
    assert not fallback
    v, fallback = fedcpa_logit_weights(torch.tensor([0.0, 0.45, 1.0], dtype=torch.float64))
    assert v.tolist() == pytest.approx([0.0, math.log(0.45 / 0.55) + 0.5, 1.0], abs=1e-12)
    v, fallback = fedcpa_logit_weights(torch.tensor([2.0, 2.0]))
    assert fallback and v.tolist() == [1.0, 1.0]


def test_aggregation_is_the_mean_of_shrunken_updates_of_kept_clients() -> None:
    # Identical scores → v = 1 everywhere → the plain mean; with v = (0, .5, 1): θ_g + (.5 Δ_1 + Δ_2) / 2.
    from spmc.defenses.fedcpa import fedcpa_aggregate

    g = torch.tensor([1.0, 0.0, 5.0])
    states = torch.tensor([[9.0, 9.0, 9.0], [3.0, 2.0, 5.0], [1.0, 4.0, 7.0]])
    int_mask = torch.tensor([False, False, True])
    new = fedcpa_aggregate(g, states, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), int_mask)
    assert new.tolist() == pytest.approx([1.0 + 0.5, 0.0 + (1.0 + 4.0) / 2, 6.0])  # counter: mean of kept (5, 7)


def test_set_helpers() -> None:
    crit = torch.tensor([[0.1, 0.4, 0.3, 0.2], [1.0, 1.0, 1.0, 1.0], [0.0, 0.2, 0.0, 0.2]])
    top, bottom = top_bottom_masks(crit, 0.5)
    assert top.tolist()[:2] == [[False, True, True, False], [True, True, False, False]]  # ties: lowest index first
    assert bottom.tolist()[:2] == [[True, False, False, True], [True, True, False, False]]
    assert top[2].tolist() == [False, True, False, True] and bottom[2].tolist() == [True, False, True, False]
    jac = jaccard_matrix(top)
    assert jac[0, 1] == pytest.approx(1 / 3) and jac[0, 2] == pytest.approx(1 / 3) and jac[1, 1] == 1.0
    assert jaccard_matrix(torch.zeros(2, 3, dtype=torch.bool)).tolist() == [[1.0, 1.0], [1.0, 1.0]]


@pytest.mark.parametrize("seed", [0, 1])
def test_pearson_matrix_matches_scipy_on_every_intersection(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(5, 300, generator=gen) ** 3 * 1e-3 + 5.0  # a large offset: the moments must not cancel
    mask = torch.rand(5, 300, generator=gen) < 0.6
    rho = pearson_matrix(x, mask)
    for i in range(5):
        for j in range(5):
            both = mask[i] & mask[j]
            ref = (scipy.stats.pearsonr(x[i, both].double().numpy(), x[j, both].double().numpy())[0] + 1) / 2
            assert float(rho[i, j]) == pytest.approx(ref, abs=1e-9)


def test_undefined_correlations_count_as_zero() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 5.0], [2.0, 2.0, 2.0, 2.0], [2.0, 1.0, 4.0, 3.0]])
    full = torch.ones(3, 4, dtype=torch.bool)
    rho = pearson_matrix(x, full)
    assert rho[0, 1] == 0.5 and rho[1, 2] == 0.5 and rho[1, 1] == 0.5  # a constant row
    assert float(rho[0, 2]) == pytest.approx((scipy.stats.pearsonr(x[0], x[2])[0] + 1) / 2, abs=1e-12)
    one = torch.tensor([[True, False, False, False], [True, True, True, True], [False, True, True, True]])
    rho = pearson_matrix(x, one)
    assert rho[0, 2] == 0.5 and rho[0, 1] == 0.5  # fewer than two shared entries


def test_only_two_and_four_dimensional_weights_are_scored() -> None:
    layout = bn_layout()
    mask = critical_mask(layout)
    assert int(mask.sum()) == 12 and bool(mask[layout.entries[0].slice].all())
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(layout.dim, generator=gen)
    states = g + torch.randn(5, layout.dim, generator=gen)
    out = FedCPA().aggregate(inputs_for(layout, g, states, list(range(5))))
    changed = states.clone()
    changed[:, ~mask] += torch.randn(5, int((~mask).sum()), generator=gen)
    out2 = FedCPA().aggregate(inputs_for(layout, g, changed, list(range(5))))
    assert out.diagnostics["scores"] == out2.diagnostics["scores"]
    only_bias = critical_mask(ParamLayout.from_module(nn.BatchNorm1d(2)))
    assert only_bias.tolist() == [True] * 4 + [False] * 5  # no 2-D/4-D tensor: every parameter


def test_identical_clients_give_the_uniform_mean() -> None:
    layout = bn_layout()
    g = torch.zeros(layout.dim)
    states = torch.ones(3, layout.dim)
    out = FedCPA().aggregate(inputs_for(layout, g, states, [0, 1, 2]))
    assert out.diagnostics["uniform_fallback"] is True
    assert torch.allclose(out.global_state, torch.ones(layout.dim))
    single = FedCPA().aggregate(inputs_for(layout, g, states[:1] * 2, [4]))
    assert torch.allclose(single.global_state, torch.full((layout.dim,), 2.0))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 7))
def test_permutation_invariance_and_weights(seed: int, n: int) -> None:
    layout = bn_layout()
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(layout.dim, generator=gen)
    states = g + torch.randn(n, layout.dim, generator=gen) * torch.rand(n, 1, generator=gen)
    states[:, layout.int_mask()] = torch.randint(0, 9, (n, 1), generator=gen).float()
    ids = torch.randperm(40, generator=gen)[:n].tolist()
    out = FedCPA().aggregate(inputs_for(layout, g, states, ids))
    perm = torch.randperm(n, generator=gen)
    out_p = FedCPA().aggregate(inputs_for(layout, g, states[perm], [ids[i] for i in perm]))
    assert torch.allclose(out.global_state, out_p.global_state, atol=1e-6)
    assert out.diagnostics["weights"] == pytest.approx(out_p.diagnostics["weights"], abs=1e-12)
    assert set(out.accepted) == set(out_p.accepted)
    assert out.weights is not None and bool((out.weights >= 0).all())
    assert float(out.weights.sum()) == pytest.approx(1.0, abs=1e-12)


def test_from_config_and_validation() -> None:
    from spmc.config import Experiment

    assert build_as("fedcpa", Experiment(fedcpa_top_rate=0.3)).options.top_rate == 0.3
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="fedcpa_top_rate"):
            FedCPA(FedCPAOptions(top_rate=bad))
