"""FLTrust (spec §6.11 [REC]): ReLU-cosine trust against the server's update, norm rescaling, D31 masking."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from spmc.config import Experiment, build_as
from spmc.defenses.base import RoundInputs
from spmc.defenses.fltrust import FLTrust, FLTrustOptions, cosines_and_norms, fltrust_apply, fltrust_trust_scores
from spmc.defenses.server_data import ServerData
from spmc.params import ParamLayout


class FixedUpdateServer(ServerData):
    """ServerData whose training returns θ + Δ_0 for a given Δ_0 (a hand-computable server update)."""

    delta0: torch.Tensor

    def train(self, state: torch.Tensor, epochs: int, round_seed: int = 0) -> torch.Tensor:
        return state + self.delta0


def bn_layout() -> ParamLayout:
    """Linear(1, 1) + BatchNorm1d(1): entries w, b, γ, β (params), running mean/var (float), counter (int)."""
    return ParamLayout.from_module(nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1)))


def fixed_server(layout: ParamLayout, delta0: list[float]) -> FixedUpdateServer:
    data = FixedUpdateServer(
        torch.zeros(8, 1), torch.zeros(8, dtype=torch.long), lambda x, g: x, nn.Identity(), layout, batch_size=8
    )
    data.delta0 = torch.tensor(delta0)
    return data


def make_inputs(
    global_state: torch.Tensor, states: torch.Tensor, layout: ParamLayout, data: ServerData | None, ids=None
) -> RoundInputs:
    n = states.shape[0]
    return RoundInputs(
        global_state=global_state,
        client_states=states,
        client_ids=tuple(ids) if ids is not None else tuple(range(n)),
        num_samples=torch.full((n,), 100.0, dtype=torch.float64),
        layout=layout,
        round=1,
        server_data=data,
    )


# Δ_0 = (2, 0 | 0, 0, 0, 0 | 0): only the first weight moves; the last entry is the integer counter.
DELTA0 = [2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
UPDATES = torch.tensor(
    [
        [3.0, 4.0, 0.0, 0.0, 0.0, 0.0, 50.0],  # cos 0.6, ‖Δ‖ 5 → TS = 0.6·2/5
        [-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 50.0],  # cos −1 → TS 0
        [0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 50.0],  # cos 0 → TS 0
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 50.0],  # cos 1, ‖Δ‖ 1 → TS = 2/1
    ]
)


def test_trust_scores_hand_computed() -> None:
    layout = bn_layout()
    g = torch.tensor([0.5, -1.0, 1.0, 0.0, 0.0, 1.0, 7.0])
    states = g + UPDATES
    agg = FLTrust(FLTrustOptions(public_epochs=3)).aggregate(
        make_inputs(g, states, layout, fixed_server(layout, DELTA0))
    )
    ts = [0.6 * 2 / (5 + 1e-5), 0.0, 0.0, 2 / (1 + 1e-5)]
    got = agg.diagnostics["trust_scores"]
    assert [got[str(k)] for k in range(4)] == pytest.approx(ts, rel=1e-12)
    assert [agg.diagnostics["cosines"][str(k)] for k in range(4)] == pytest.approx([0.6, -1.0, 0.0, 1.0], abs=1e-12)
    assert agg.diagnostics["server_update_norm"] == pytest.approx(2.0)
    total = sum(ts)
    assert agg.weights.tolist() == pytest.approx([t / total for t in ts], rel=1e-12)
    expected = g.double() + sum(t * UPDATES[k].double() for k, t in enumerate(ts)) / (total + 1e-5)
    assert torch.allclose(agg.global_state.double(), expected, atol=1e-6)
    # The step is a weighted mean of the updates, not rescaled to ‖Δ_0‖: first coordinate ≈ (0.24·3 + 2·1)/2.24.
    assert float(agg.global_state[0] - g[0]) == pytest.approx((0.24 * 3 + 2) / 2.24, rel=1e-4)
    assert agg.accepted == (0, 3)
    assert agg.diagnostics["removed"] == [1, 2]


def test_integer_counter_left_out_of_cosines_and_norms() -> None:
    layout = bn_layout()
    g = torch.zeros(layout.dim)
    states = g + UPDATES
    mask = layout.stat_mask()
    cos, norms, ref = cosines_and_norms(states, g, torch.tensor(DELTA0), mask)
    assert norms.tolist() == pytest.approx([5.0, 1.0, 2.0, 1.0])
    # With the counter inside (repo profile), its +50 dominates ‖Δ_k‖ and the trust collapses.
    data = fixed_server(layout, DELTA0)
    masked = FLTrust(FLTrustOptions(exclude_int_buffers=True)).aggregate(make_inputs(g, states, layout, data))
    unmasked = FLTrust(FLTrustOptions(exclude_int_buffers=False)).aggregate(make_inputs(g, states, layout, data))
    assert unmasked.diagnostics["cosines"]["3"] == pytest.approx(1 / math.sqrt(1 + 50**2), rel=1e-9)
    assert masked.diagnostics["trust_scores"]["3"] > 30 * unmasked.diagnostics["trust_scores"]["3"]


def test_all_negative_cosines_leave_the_global_model_unchanged() -> None:
    layout = bn_layout()
    g = torch.arange(7, dtype=torch.float32)
    states = g - torch.tensor(DELTA0) * torch.tensor([[1.0], [2.0], [0.5]])
    agg = FLTrust().aggregate(make_inputs(g, states, layout, fixed_server(layout, DELTA0)))
    assert agg.weights is None
    assert agg.accepted == ()
    assert torch.equal(agg.global_state, g)
    assert agg.diagnostics["removed"] == [0, 1, 2]
    assert "weights" not in agg.diagnostics


def test_pure_functions_and_zero_vectors() -> None:
    states = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    cos, norms, ref = cosines_and_norms(states, torch.zeros(2), torch.tensor([1.0, 1.0]))
    assert cos.tolist() == pytest.approx([0.0, 1.0]) and ref == pytest.approx(math.sqrt(2))
    ts = fltrust_trust_scores(cos, norms, ref)
    assert ts.tolist() == pytest.approx([0.0, math.sqrt(2) / (math.sqrt(2) + 1e-5)])
    out = fltrust_apply(torch.zeros(2), states, ts)
    assert out.tolist() == pytest.approx([float(ts[1] / (ts[1] + 1e-5))] * 2)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 6), seed=st.integers(0, 10_000))
def test_scale_invariance_and_permutation(n: int, seed: int) -> None:
    """A client whose update is scaled by c > 0 keeps its cosine and its TS scales by 1/c (norm rescaling);
    permuting the clients permutes nothing."""
    layout = bn_layout()
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(7, generator=gen)
    upd = torch.randn(n, 7, generator=gen)
    delta0 = torch.randn(7, generator=gen)
    data = fixed_server(layout, delta0.tolist())
    mask = layout.stat_mask()
    cos, norms, ref = cosines_and_norms(g + upd, g, delta0, mask)
    scaled = upd.clone()
    scaled[0] *= 10.0
    cos2, norms2, _ = cosines_and_norms(g + scaled, g, delta0, mask)
    assert cos2[0] == pytest.approx(float(cos[0]), abs=1e-6)
    ts, ts2 = fltrust_trust_scores(cos, norms, ref), fltrust_trust_scores(cos2, norms2, ref)
    assert float(ts2[0]) == pytest.approx(float(ts[0]) / 10.0, rel=1e-4, abs=1e-9)

    ids = list(range(10, 10 + n))
    perm = torch.randperm(n, generator=gen).tolist()
    a = FLTrust().aggregate(make_inputs(g, g + upd, layout, data, ids))
    b = FLTrust().aggregate(make_inputs(g, (g + upd)[perm], layout, data, [ids[i] for i in perm]))
    assert torch.allclose(a.global_state, b.global_state, atol=1e-6)
    assert a.diagnostics["trust_scores"] == pytest.approx(b.diagnostics["trust_scores"], abs=1e-12)
    assert set(a.accepted) == set(b.accepted)
    if a.weights is not None:
        assert float(a.weights.sum()) == pytest.approx(1.0) and bool((a.weights >= 0).all())


def test_real_server_update_on_server_data() -> None:
    """With the real ServerData.train: a client moving along Δ_0 gets cos 1, one moving against it gets 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    layout = ParamLayout.from_module(model)
    gen = torch.Generator().manual_seed(0)
    data = ServerData(
        torch.rand(16, 3, 4, 4, generator=gen),
        torch.randint(0, 3, (16,), generator=gen),
        lambda x, g: x,
        model,
        layout,
        8,
    )
    g = layout.flatten(model)
    delta0 = data.train(g, 2, round_seed=1) - g
    states = torch.stack([g + 0.5 * delta0, g - delta0, g + delta0])
    agg = FLTrust(FLTrustOptions(public_epochs=2)).aggregate(make_inputs(g, states, layout, data))
    cos = agg.diagnostics["cosines"]
    assert (cos["0"], cos["1"], cos["2"]) == pytest.approx((1.0, -1.0, 1.0), abs=1e-5)
    assert agg.accepted == (0, 2)
    # TS_0 ≈ 2, TS_2 ≈ 1 → weights 2/3, 1/3; the step is (2/3)(Δ_0/2) + (1/3)Δ_0 = (2/3)Δ_0.
    assert agg.weights.tolist() == pytest.approx([2 / 3, 0.0, 1 / 3], abs=1e-4)
    assert torch.allclose(agg.global_state, g + (2 / 3) * delta0, atol=1e-5)


def test_invalid_options_and_missing_data() -> None:
    with pytest.raises(ValueError, match="fltrust_public_epochs"):
        FLTrust(FLTrustOptions(public_epochs=0))
    layout = bn_layout()
    g = torch.zeros(7)
    with pytest.raises(ValueError, match="needs the server's validation data"):
        FLTrust().aggregate(make_inputs(g, g + UPDATES, layout, None))


def test_from_config() -> None:
    d = build_as("fltrust", Experiment(fltrust_public_epochs=4, profile="repo"))
    assert (d.options.public_epochs, d.options.exclude_int_buffers) == (4, False)
    assert FLTrust.needs_server_data and FLTrust.name == "fltrust"


def test_server_training_is_reused_for_the_same_state_epochs_and_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """ServerData.train trains once per (state, epochs, round): an adaptive attack's copies of FLTrust and the server
    share it; the reused state equals a fresh training, and a caller cannot corrupt it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    layout = ParamLayout.from_module(model)
    gen = torch.Generator().manual_seed(0)
    data = ServerData(
        torch.rand(16, 3, 4, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen), lambda x, g: x, model,
        layout, 8,
    )  # fmt: skip
    g = layout.flatten(model)
    first = data.train(g, 2, round_seed=1)
    fresh = ServerData(data.x, data.y, data.transform, model, layout, 8).train(g, 2, round_seed=1)
    calls = []
    real = ServerData._train
    monkeypatch.setattr(ServerData, "_train", lambda self, *a: calls.append(a) or real(self, *a))
    again = data.train(g.clone(), 2, round_seed=1)
    assert calls == [] and torch.equal(again, first) and torch.equal(again, fresh)
    again.add_(1.0)  # the caller's copy, not the memo
    assert torch.equal(data.train(g, 2, round_seed=1), first) and calls == []
    data.train(g, 2, round_seed=2)
    data.train(g, 1, round_seed=2)
    data.train(g + 1e-3, 1, round_seed=2)
    assert len(calls) == 3
