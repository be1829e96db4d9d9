"""drop_last (spec D30, issue 11): the last partial batch trained on both engines, and the refusal of
configurations in which most clients would take no step."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from spmc import make_experiment, native
from spmc.batched import BatchedEngine, pad_batches
from spmc.config import ConfigError, expected_train_size
from spmc.simulation import Simulation, optim_config
from spmc.training import ClientData, ClientTask, SequentialEngine, batches

needs_compiler = pytest.mark.skipif(native._compiler() is None, reason="no C compiler on this machine")


@pytest.mark.parametrize(
    ("n", "floor_steps", "ceil_steps"), [(0, 0, 0), (1, 0, 1), (63, 0, 1), (64, 1, 1), (65, 1, 2), (130, 2, 3)]
)
def test_steps_per_epoch_is_floor_or_ceil(n: int, floor_steps: int, ceil_steps: int) -> None:
    data = ClientData(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long))
    assert data.steps_per_epoch(64) == floor_steps
    assert data.steps_per_epoch(64, drop_last=True) == floor_steps
    assert data.steps_per_epoch(64, drop_last=False) == ceil_steps


def test_batches_without_drop_last_yield_the_partial_batch_after_the_same_full_ones() -> None:
    data = ClientData(torch.arange(10.0).view(10, 1), torch.arange(10), final=True)
    kept = list(batches(data, 2, 4, torch.Generator().manual_seed(0), drop_last=False))
    dropped = list(batches(data, 2, 4, torch.Generator().manual_seed(0), drop_last=True))
    assert [len(y) for _, y in kept] == [4, 4, 2, 4, 4, 2]  # ⌈10/4⌉ = 3 steps per epoch
    for epoch in (kept[:3], kept[3:]):
        assert sorted(torch.cat([y for _, y in epoch]).tolist()) == list(range(10))  # every sample once
    assert torch.equal(kept[0][1], dropped[0][1]) and torch.equal(kept[4][1], dropped[3][1])  # same draws
    small = ClientData(torch.zeros(3, 1), torch.arange(3))
    assert [len(y) for _, y in batches(small, 2, 4, torch.Generator(), drop_last=False)] == [3, 3]


def test_pad_batches_zero_pads_keeps_grey_views_and_masks_real_samples() -> None:
    grey = torch.rand(2, 1, 32, 32).expand(-1, 3, -1, -1)
    colour = torch.rand(4, 3, 32, 32)
    same = [(colour, torch.arange(4)), (colour, torch.arange(4))]
    assert pad_batches(same) == (same, None)
    padded, mask = pad_batches([(grey, torch.tensor([7, 8])), (colour, torch.arange(4))])
    assert mask is not None and mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    x, y = padded[0]
    assert x.shape == (4, 3, 32, 32) and x.stride(1) == 0  # still one channel expanded: the native grey path
    assert torch.equal(x[:2], grey) and not x[2:].any()
    assert y.tolist() == [7, 8, 0, 0]
    assert padded[1][0] is colour


def _sim(client: str, kernel: str, drop_last: bool = False) -> Simulation:
    cfg = make_experiment(
        dataset="synthetic",
        synthetic_train_size=600,
        synthetic_test_size=20,
        num_clients=4,
        beta=0.0,  # equal split, 135 samples each, cut below to the sizes of the test
        gamma=0.25,
        rounds=1,
        baseline_local_epochs=2,
        spmc_local_epochs=2,
        batch_size=32,
        defense="spmc",
        client=client,
        malicious_client="plain",  # mixed procedures in one stacked round
        spmc_lambda=0.8,
        drop_last=drop_last,
        device="cpu",
        engine="batched",
        kernel=kernel,
    )
    return Simulation(cfg)


def _tasks(sim: Simulation, sizes: list[int]) -> list[ClientTask]:
    """Round-1 tasks of clients cut to ``sizes`` samples, with teachers away from the global model."""
    gen = torch.Generator().manual_seed(0)
    sim.teachers = {k: t + 0.02 * torch.randn(t.shape, generator=gen) for k, t in sim.teachers.items()}
    tasks = sim.tasks(1, sim.participants(1))
    cut = []
    for task, n in zip(tasks, sizes):
        d = task.data
        cut.append(dataclasses.replace(task, data=ClientData(d.x[:n], d.y[:n], d.final, d.transform)))
    return cut


@pytest.mark.parametrize("kernel", ["torch", pytest.param("native", marks=needs_compiler)])
@pytest.mark.parametrize("client", ["plain", "spmc"])
def test_batched_round_equals_sequential_round_without_drop_last(client: str, kernel: str) -> None:
    sim = _sim(client, kernel)
    assert isinstance(sim.engine, BatchedEngine) and sim.engine.kernel == kernel
    sizes = [75, 20, 64, 41]  # partial batches of 11, 20 (a client smaller than a batch), none, 9
    tasks = _tasks(sim, sizes)
    sequential = SequentialEngine(sim.model, sim.layout, optim_config(sim.cfg)).train_round(sim.global_state, tasks)
    batched = sim.engine.train_round(sim.global_state, tasks)
    assert [r.steps for r in sequential] == [2 * 3, 2 * 1, 2 * 2, 2 * 2]  # 2 epochs of ⌈n_k/32⌉ steps
    for s, b in zip(sequential, batched):
        assert (s.client_id, s.steps) == (b.client_id, b.steps)
        assert float((s.state - sim.global_state).abs().max()) > 1e-3  # the client of 20 samples trained too
        assert torch.allclose(s.state, b.state, atol=1e-6, rtol=1e-5)
        assert s.mean_loss == pytest.approx(b.mean_loss, rel=1e-5)


def test_drop_last_client_smaller_than_a_batch_takes_no_step_only_with_drop_last() -> None:
    for drop_last, steps in ((True, 0), (False, 2)):
        sim = _sim("plain", "torch", drop_last)
        (result,) = sim.engine.train_round(sim.global_state, _tasks(sim, [20])[:1])
        assert result.steps == steps
        assert torch.equal(result.state, sim.global_state) == drop_last


def test_expected_train_size() -> None:
    assert [expected_train_size(d, 123) for d in ("fmnist", "mnist", "cifar10", "fmnist-sample", "synthetic")] == [
        60_000,
        60_000,
        50_000,
        6_000,
        123,
    ]
    assert expected_train_size("other", 123) is None


def test_fmnist_sample_size_is_the_embedded_one() -> None:
    from spmc.data.datasets import load_embedded_sample

    assert load_embedded_sample()[1].shape[0] == expected_train_size("fmnist-sample", 0)


@pytest.mark.parametrize(
    ("values", "mean"),
    [
        ({"dataset": "fmnist", "num_clients": 1000, "participation": 0.1}, "54.0"),  # the case
        ({"dataset": "fmnist-sample", "num_clients": 85}, "63.5"),  # 5400 / 85
        ({"dataset": "synthetic", "synthetic_train_size": 600, "num_clients": 4, "batch_size": 136}, "135.0"),
        ({"dataset": "cifar10", "num_clients": 10, "val_fraction": 0.5, "batch_size": 2501}, "2500.0"),
    ],
)
def test_drop_last_refuses_a_mean_client_size_below_one_batch(values: dict, mean: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_experiment(**values)
    message = str(err.value).splitlines()[1].strip()
    for fragment in ("drop_last = true", f"batch_size = {values.get('batch_size', 64)}", "set drop_last = false"):
        assert fragment in message
    assert f"num_clients = {values['num_clients']}" in message and f"mean size of {mean} " in message
    assert not make_experiment(**values, drop_last=False).drop_last


@pytest.mark.parametrize(
    "values",
    [
        {"dataset": "fmnist-sample", "num_clients": 84},  # 5400 / 84 = 64.3
        {"dataset": "synthetic", "synthetic_train_size": 600, "num_clients": 4, "batch_size": 135},
        {"dataset": "fmnist", "num_clients": 1000, "batch_size": 54},
    ],
)
def test_drop_last_accepts_a_mean_client_size_of_one_batch(values: dict) -> None:
    assert make_experiment(**values).drop_last


def test_many_small_clients_train_with_drop_last_false() -> None:
    """The issue's case in small: a mean client size below one batch is refused with drop_last = true; with
    false every client trains (a client with no step would report a NaN loss)."""
    values = {"dataset": "synthetic", "synthetic_train_size": 600, "synthetic_test_size": 20, "num_clients": 12}
    with pytest.raises(ConfigError, match="mean size of 45.0 per client"):
        make_experiment(**values, baseline_local_epochs=1, rounds=1)
    sim = Simulation(make_experiment(**values, baseline_local_epochs=1, rounds=1, drop_last=False, device="cpu"))
    assert min(sim.data.num_samples.values()) < 64
    record = sim.run_round(0)
    assert len(record["client_loss"]) == 12
    assert all(math.isfinite(loss) for loss in record["client_loss"].values())
    assert record["samples"] == sum(sim.data.num_samples.values())  # every sample once, partial batches included
