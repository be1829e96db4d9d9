"""Sageflow (spec §6.3, D19 [REC]): weights from each local model's loss and entropy on the server data."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spmc.config import Experiment, build_as
from spmc.defenses.base import RoundInputs
from spmc.defenses.sageflow import Sageflow, SageflowOptions, sageflow_kept, sageflow_weights
from spmc.defenses.server_data import ServerData
from spmc.params import ParamLayout


def make_server_data(n: int = 24, batch_size: int = 8, seed: int = 0) -> ServerData:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 4, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return ServerData(x, y, lambda xb, gen: xb, model, ParamLayout.from_module(model), batch_size=batch_size)


def make_inputs(states: torch.Tensor, data: ServerData | None, ids: tuple[int, ...] | None = None) -> RoundInputs:
    n = states.shape[0]
    return RoundInputs(
        global_state=torch.zeros(states.shape[1]),
        client_states=states,
        client_ids=ids if ids is not None else tuple(range(n)),
        num_samples=torch.arange(1, n + 1, dtype=torch.float64) * 10,
        layout=data.layout if data is not None else ParamLayout.from_module(nn.Linear(48, 3)),
        round=3,
        server_data=data,
    )


def client_states(data: ServerData, seed: int = 1) -> torch.Tensor:
    """Three confident random models (low entropy) and the all-zero model (uniform predictions, H = ln 3)."""
    g = torch.Generator().manual_seed(seed)
    confident = 3.0 * torch.randn(3, data.layout.dim, generator=g)
    return torch.cat([confident, torch.zeros(1, data.layout.dim)])


def direct_loss_entropy(data: ServerData, state: torch.Tensor) -> tuple[float, float]:
    """ℓ and H computed without ServerData: one linear map, batches of 8 in order."""
    w = state[:144].reshape(3, 48)
    b = state[144:]
    losses, ents = [], []
    for s in range(0, len(data), data.batch_size):
        logits = data.x[s : s + data.batch_size].reshape(-1, 48) @ w.T + b
        losses.append(F.cross_entropy(logits, data.y[s : s + data.batch_size]).item())
        logp = torch.log_softmax(logits.double(), 1)
        ents.append(float(-(logp.exp() * logp).sum(1).mean()))
    return sum(losses) / len(losses), sum(ents) / len(ents)


def test_weights_hand_computed() -> None:
    losses = torch.tensor([0.5, 1.0, 2.0])
    ents = torch.tensor([0.1, 0.2, 3.0])
    w, fallback = sageflow_weights(losses, ents, eth=2.0, delta=1.0)
    assert not fallback
    assert w.tolist() == pytest.approx([2 / 3, 1 / 3, 0.0], abs=1e-15)
    w, _ = sageflow_weights(losses, ents, eth=2.0, delta=2.0)
    assert w.tolist() == pytest.approx([4 / 5, 1 / 5, 0.0], abs=1e-15)
    w, _ = sageflow_weights(losses, ents, eth=2.0, delta=1.0, num_samples=torch.tensor([1.0, 4.0, 10.0]))
    assert w.tolist() == pytest.approx([2 / 6, 4 / 6, 0.0], abs=1e-15)
    w, _ = sageflow_weights(losses, ents, eth=5.0, delta=0.0)
    assert w.tolist() == pytest.approx([1 / 3] * 3, abs=1e-15)


def test_non_finite_and_zero_losses() -> None:
    w, fallback = sageflow_weights(torch.tensor([math.nan, 1.0, 0.0]), torch.tensor([0.1, 0.1, 0.1]))
    assert not fallback
    assert w[0] == 0.0 and w[2] > 0.999_999
    assert sageflow_kept(torch.tensor([1.0, 1.0]), torch.tensor([math.inf, 2.0]), eth=2.0).tolist() == [False, False]


def test_all_filtered_falls_back_to_uniform() -> None:
    w, fallback = sageflow_weights(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.5, 9.0]), eth=2.0)
    assert fallback
    assert w.tolist() == [1 / 3] * 3


def test_aggregate_uses_each_local_model_on_server_data() -> None:
    data = make_server_data()
    states = client_states(data)
    pairs = [data.loss_and_entropy(s, 3) for s in states]
    for s, (ell, h) in zip(states, pairs):
        assert (ell, h) == pytest.approx(direct_loss_entropy(data, s), rel=1e-5, abs=1e-6)
    assert pairs[3] == pytest.approx((math.log(3), math.log(3)), rel=1e-6)
    assert max(h for _, h in pairs[:3]) < 1.0

    agg = Sageflow(SageflowOptions(eth=1.0, delta=1.0)).aggregate(make_inputs(states, data))
    inv = torch.tensor([1 / ell for ell, _ in pairs[:3]] + [0.0], dtype=torch.float64)
    expected = inv / inv.sum()
    assert torch.allclose(agg.weights, expected, atol=1e-12)
    assert float(agg.weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(agg.global_state, (expected.float() @ states), atol=1e-5)
    assert agg.accepted == (0, 1, 2)
    assert agg.diagnostics["removed"] == [3] and agg.diagnostics["entropy_filtered"] == [3]
    assert agg.diagnostics["uniform_fallback"] is False
    assert agg.diagnostics["losses"]["1"] == pytest.approx(pairs[1][0])
    assert agg.diagnostics["entropies"]["3"] == pytest.approx(math.log(3), rel=1e-6)


def test_size_weight_multiplies_by_num_samples() -> None:
    data = make_server_data()
    states = client_states(data)
    inputs = make_inputs(states, data)
    pairs = [data.loss_and_entropy(s, 3) for s in states]
    agg = Sageflow(SageflowOptions(eth=1.0, size_weight=True)).aggregate(inputs)
    a = torch.tensor([10 * (k + 1) / pairs[k][0] for k in range(3)] + [0.0], dtype=torch.float64)
    assert torch.allclose(agg.weights, a / a.sum(), atol=1e-12)


def test_aggregate_fallback_is_the_uniform_mean() -> None:
    data = make_server_data()
    states = client_states(data)
    agg = Sageflow(SageflowOptions(eth=1e-9)).aggregate(make_inputs(states, data))
    assert agg.diagnostics["uniform_fallback"] is True
    assert agg.weights.tolist() == [0.25] * 4
    assert agg.accepted == (0, 1, 2, 3)
    assert agg.diagnostics["entropy_filtered"] == [0, 1, 2, 3]
    assert torch.allclose(agg.global_state, states.mean(0), atol=1e-6)


def test_permuting_clients_permutes_nothing() -> None:
    data = make_server_data()
    states = client_states(data)
    ids = (7, 2, 5, 11)
    a = Sageflow(SageflowOptions(eth=1.0)).aggregate(make_inputs(states, data, ids))
    perm = [2, 0, 3, 1]
    b = Sageflow(SageflowOptions(eth=1.0)).aggregate(make_inputs(states[perm], data, tuple(ids[i] for i in perm)))
    assert torch.allclose(a.global_state, b.global_state, atol=1e-6)
    assert a.diagnostics["weights"] == pytest.approx(b.diagnostics["weights"], abs=1e-12)
    assert set(a.accepted) == set(b.accepted) == {7, 2, 5}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"eth": 0.0}, "sageflow_eth"), ({"eth": math.nan}, "sageflow_eth"), ({"delta": -1.0}, "sageflow_delta")],
)
def test_invalid_options(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Sageflow(SageflowOptions(**kwargs))


def test_missing_or_too_small_server_data() -> None:
    data = make_server_data()
    states = client_states(data)
    with pytest.raises(ValueError, match="needs the server's validation data"):
        Sageflow().aggregate(make_inputs(states, None))
    small = make_server_data(n=5, batch_size=8)
    with pytest.raises(ValueError, match="val_fraction.*5 samples.*batch_size = 8"):
        Sageflow().aggregate(make_inputs(states, small))


def test_from_config() -> None:
    d = build_as(
        "sageflow", Experiment(defense="fedavg", sageflow_eth=1.5, sageflow_delta=2.0, sageflow_size_weight=True)
    )
    assert (d.options.eth, d.options.delta, d.options.size_weight) == (1.5, 2.0, True)
    assert Sageflow.needs_server_data and Sageflow.name == "sageflow"


def test_evaluations_are_reused_within_a_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """A state evaluated once in a round is not evaluated again (an adaptive attack probes a copy of Sageflow many
    times a round with mostly the same states); the reused result equals a fresh evaluation; a changed state, another
    round and a full memo are evaluated again."""
    data = make_server_data()
    states = client_states(data)
    calls: list[int] = []
    real = ServerData._loss_and_entropy
    monkeypatch.setattr(ServerData, "_loss_and_entropy", lambda self, s, r: calls.append(r) or real(self, s, r))
    first = Sageflow(SageflowOptions(eth=1.0)).aggregate(make_inputs(states, data))
    assert len(calls) == 4
    probe = states.clone()
    probe[2] += 0.5
    second = Sageflow(SageflowOptions(eth=1.0)).aggregate(make_inputs(probe, data))
    assert len(calls) == 5  # only the changed row
    expected = [direct_loss_entropy(data, s)[0] for s in probe]
    assert [second.diagnostics["losses"][str(k)] for k in range(4)] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    again = Sageflow(SageflowOptions(eth=1.0)).aggregate(make_inputs(states.clone(), data))
    assert len(calls) == 5 and torch.equal(again.weights, first.weights)
    data.loss_and_entropy(states[0], 4)
    assert calls[-1] == 4 and len(calls) == 6
    monkeypatch.setattr("spmc.defenses.server_data._EVAL_MEMO_BYTES", 2 * states[0].numel() * 4)
    fresh = make_server_data()
    calls.clear()
    for row in (0, 1, 2, 0, 1, 2):  # least recently used first out: with room for two, each is evaluated again
        fresh.loss_and_entropy(states[row], 3)
    assert len(calls) == 6
    for row in (1, 0, 1):  # 1 is used again, so 2 (not 1) makes room for 0
        fresh.loss_and_entropy(states[row], 3)
    assert len(calls) == 7


def test_a_non_finite_state_is_evaluated_but_not_remembered() -> None:
    """NaN never equals itself, so a NaN state could never be found again: it is not stored (it would only push
    useful states out)."""
    data = make_server_data()
    bad = torch.full((data.layout.dim,), math.nan)
    for _ in range(3):
        ell, h = data.loss_and_entropy(bad, 3)
        assert math.isnan(ell) and math.isnan(h)
    assert data._evals is not None and data._evals[1] == []


def test_the_transform_runs_once_per_round() -> None:
    """Every state of a round is evaluated on one transformed copy of the server data (the batches depend only on
    the round): the transform runs once per batch per round, not once per batch per state."""
    data = make_server_data()
    calls: list[int] = []
    data.transform = lambda xb, gen: calls.append(1) or xb + torch.rand(xb.shape, generator=gen)
    states = client_states(data)
    first = [data.loss_and_entropy(s, 3) for s in states]
    assert len(calls) == len(data) // data.batch_size == 3
    data.loss_and_entropy(states[0] + 1.0, 3)
    assert len(calls) == 3
    data.loss_and_entropy(states[0], 4)
    assert len(calls) == 6
    fresh = make_server_data()
    fresh.transform = data.transform
    assert fresh.loss_and_entropy(states[1], 3) == first[1]
