"""The batched engine gives the same client states as the sequential reference (issue 4)."""

from __future__ import annotations

import pytest
import torch

from spmc import make_experiment, native
from spmc.batched import BatchedEngine, GroupedConv, SharedInputBlock, StackedSimpleCNN
from spmc.models import SimpleCNN
from spmc.params import ParamLayout
from spmc.simulation import Simulation, optim_config
from spmc.training import SequentialEngine

needs_compiler = pytest.mark.skipif(native._compiler() is None, reason="no C compiler on this machine")


def test_stacked_forward_equals_per_client_forward() -> None:
    torch.manual_seed(0)
    models = [SimpleCNN() for _ in range(3)]
    layout = ParamLayout.from_module(models[0])
    rows = torch.stack([layout.flatten(m) for m in models])
    x = torch.randn(3, 5, 3, 32, 32)
    net = StackedSimpleCNN(layout)
    stacked = net.forward(net.tensors(rows), x.permute(1, 0, 2, 3, 4).reshape(5, 9, 32, 32))
    for k, m in enumerate(models):
        assert torch.allclose(stacked[k], m(x[k]), atol=1e-5)


@pytest.mark.parametrize("kernel", ["torch", pytest.param("native", marks=needs_compiler)])
@pytest.mark.parametrize(("client", "granularity"), [("plain", "tensor"), ("spmc", "tensor"), ("spmc", "model")])
def test_batched_round_equals_sequential_round(client: str, granularity: str, kernel: str) -> None:
    cfg = make_experiment(
        dataset="synthetic",
        synthetic_train_size=1200,
        synthetic_test_size=100,
        num_clients=5,
        gamma=0.4,
        rounds=2,
        baseline_local_epochs=2,
        spmc_local_epochs=2,
        defense="spmc",
        client=client,
        malicious_client="plain",  # mixed procedures in one stacked round
        spmc_proj_granularity=granularity,
        spmc_lambda=0.8,
        device="cpu",
        engine="batched",
        kernel=kernel,
    )
    sim = Simulation(cfg)
    assert isinstance(sim.engine, BatchedEngine)
    assert sim.engine.kernel == kernel
    sim.run_round(0)  # teachers differ from the global model from round 1 on
    tasks = sim.tasks(1, sim.participants(1))
    sequential = SequentialEngine(sim.model, sim.layout, optim_config(sim.cfg)).train_round(sim.global_state, tasks)
    batched = sim.engine.train_round(sim.global_state, tasks)
    assert len({r.steps for r in sequential}) > 1  # clients with different numbers of steps: masking is exercised
    for s, b in zip(sequential, batched):
        assert (s.client_id, s.steps) == (b.client_id, b.steps)
        moved = float((s.state - sim.global_state).abs().max())
        assert moved > 1e-3
        assert torch.allclose(s.state, b.state, atol=1e-6, rtol=1e-5)
        assert s.mean_loss == pytest.approx(b.mean_loss, rel=1e-5)


def test_auto_engine_choice_and_refusal() -> None:
    small = {"dataset": "synthetic", "synthetic_train_size": 200, "synthetic_test_size": 20, "num_clients": 2}
    assert Simulation(make_experiment(**small)).engine.name == "batched"
    assert Simulation(make_experiment(**small, engine="sequential")).engine.name == "sequential"
    assert Simulation(make_experiment(**small, model="resnet10")).engine.name == "sequential"
    with pytest.raises(ValueError, match="engine: 'batched' supports SimpleCNN only"):
        Simulation(make_experiment(**small, model="resnet10", engine="batched"))


@pytest.mark.parametrize(("groups", "cin", "cout", "k"), [(1, 3, 6, 5), (3, 6, 16, 5), (2, 2, 3, 3)])
def test_grouped_conv_gradients(groups: int, cin: int, cout: int, k: int) -> None:
    """The custom input gradient (flipped convolution) and weight gradient match finite differences."""
    torch.manual_seed(0)
    x = torch.randn(2, groups * cin, 9, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(groups * cout, cin, k, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: GroupedConv.apply(a, b, groups), (x, w))
    y = GroupedConv.apply(x, w, groups)
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, groups=groups))


def test_shared_input_block_equals_two_blocks_and_its_gradient_is_the_students() -> None:
    torch.manual_seed(0)
    groups, cin, cout = 3, 3, 6
    x = torch.randn(2, groups * cin, 12, 12, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w_s, w_t = (torch.randn(groups * cout, cin, 5, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    b_s, b_t = (torch.randn(groups * cout, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def block(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.max_pool2d(torch.nn.functional.conv2d(x, w, groups=groups), 2)
        return torch.relu(pooled + b.view(1, -1, 1, 1))

    h_s, h_t = SharedInputBlock.apply(x, w_s, b_s, w_t, b_t, groups)
    torch.testing.assert_close(h_s, block(w_s, b_s))
    torch.testing.assert_close(h_t, block(w_t, b_t))
    assert not h_t.requires_grad
    assert torch.autograd.gradcheck(lambda w, b: SharedInputBlock.apply(x, w, b, w_t, b_t, groups)[0], (w_s, b_s))


def test_stacked_model_refuses_the_other_kernels_input() -> None:
    layout = ParamLayout.from_module(SimpleCNN())
    params = StackedSimpleCNN(layout).tensors(torch.zeros(2, layout.dim))
    images = native.ImageBatch(torch.zeros(2 * 3 * 32 * 32), torch.tensor([0, 3 * 32 * 32]), torch.tensor([3, 3]), 1)
    with pytest.raises(TypeError, match="torch's kernel takes a tensor"):
        StackedSimpleCNN(layout).forward(params, images)
    with pytest.raises(TypeError, match="native kernel takes a spmc.native.ImageBatch, got Tensor"):
        StackedSimpleCNN(layout, native=True).forward(params, torch.zeros(1, 6, 32, 32))
