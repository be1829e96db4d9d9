"""Finetuning (spec §6.10, D26): uniform mean, fine-tuned on the server data; broadcast vs evaluated model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spmc.config import Experiment, build_as
from spmc.defenses.base import RoundInputs
from spmc.defenses.finetuning import Finetuning, FinetuningOptions
from spmc.defenses.server_data import ServerData
from spmc.params import ParamLayout


def make_server_data() -> ServerData:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 3, 4, 4, generator=g)
    y = torch.randint(0, 3, (24,), generator=g)
    return ServerData(x, y, lambda xb, gen: xb, model, ParamLayout.from_module(model), batch_size=8)


def make_inputs(data: ServerData | None, layout: ParamLayout, states: torch.Tensor, ids=None) -> RoundInputs:
    n = states.shape[0]
    return RoundInputs(
        global_state=torch.zeros(layout.dim),
        client_states=states,
        client_ids=tuple(ids) if ids is not None else tuple(range(n)),
        num_samples=torch.tensor([10.0, 500.0, 30.0][:n], dtype=torch.float64),
        layout=layout,
        round=4,
        server_data=data,
    )


def states_for(layout: ParamLayout) -> torch.Tensor:
    return torch.randn(3, layout.dim, generator=torch.Generator().manual_seed(1))


def test_no_broadcast_evaluates_the_finetuned_mean() -> None:
    data = make_server_data()
    states = states_for(data.layout)
    agg = Finetuning(FinetuningOptions(epochs=2, broadcast=False)).aggregate(make_inputs(data, data.layout, states))
    mean = states.mean(0)
    assert torch.allclose(agg.global_state, mean, atol=1e-6)  # uniform, not sample-weighted
    assert agg.weights.tolist() == [1 / 3] * 3 and agg.accepted == (0, 1, 2)
    tuned = data.train(mean, 2, round_seed=4)
    assert agg.eval_state is not None
    assert torch.allclose(agg.eval_state, tuned, atol=1e-6)
    assert float((agg.eval_state - mean).norm()) > 1e-3  # fine-tuning moved it
    assert agg.diagnostics["finetune_shift_norm"] == pytest.approx(float((tuned - mean).norm()), rel=1e-4)


def test_broadcast_sends_the_finetuned_model() -> None:
    data = make_server_data()
    states = states_for(data.layout)
    agg = Finetuning(FinetuningOptions(epochs=1, broadcast=True)).aggregate(make_inputs(data, data.layout, states))
    assert agg.eval_state is None
    assert torch.allclose(agg.global_state, data.train(states.mean(0), 1, round_seed=4), atol=1e-6)


def test_zero_epochs_is_the_uniform_mean() -> None:
    layout = ParamLayout.from_module(nn.Sequential(nn.Flatten(), nn.Linear(48, 3)))
    states = states_for(layout)
    agg = Finetuning(FinetuningOptions(epochs=0)).aggregate(make_inputs(None, layout, states))
    assert torch.allclose(agg.global_state, states.mean(0), atol=1e-6)
    assert torch.equal(agg.eval_state, agg.global_state)


def test_permuting_clients_permutes_nothing() -> None:
    data = make_server_data()
    states = states_for(data.layout)
    a = Finetuning().aggregate(make_inputs(data, data.layout, states, ids=[4, 9, 1]))
    b = Finetuning().aggregate(make_inputs(data, data.layout, states[[2, 0, 1]], ids=[1, 4, 9]))
    assert torch.allclose(a.global_state, b.global_state, atol=1e-6)
    assert torch.allclose(a.eval_state, b.eval_state, atol=1e-5)


def test_invalid_options_and_missing_data() -> None:
    with pytest.raises(ValueError, match="finetune_epochs"):
        Finetuning(FinetuningOptions(epochs=-1))
    layout = ParamLayout.from_module(nn.Sequential(nn.Flatten(), nn.Linear(48, 3)))
    with pytest.raises(ValueError, match="needs the server's validation data"):
        Finetuning(FinetuningOptions(epochs=1)).aggregate(make_inputs(None, layout, states_for(layout)))


def test_from_config() -> None:
    d = build_as("finetuning", Experiment(finetune_epochs=3, finetune_broadcast=True))
    assert (d.options.epochs, d.options.broadcast) == (3, True)
    assert Finetuning.needs_server_data and Finetuning.name == "finetuning"
