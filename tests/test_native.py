"""The compiled first-block kernel (spmc.native, csrc/conv1_pool.c) against torch and hand-computed cases."""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spmc import make_experiment, native
from spmc.batched import resolve_kernel
from spmc.simulation import Simulation

pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C compiler on this machine")


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    built = native.load()
    assert built is not None, "a C compiler is present, so the kernel must build"
    return built


def _images(groups: int, batch: int, seed: int = 0, grey: tuple[bool, ...] = ()) -> native.ImageBatch:
    """Random images with a constant patch (every pooling window there is a tie); client k's three channels are
    equal where ``grey[k]`` (default: none)."""
    torch.manual_seed(seed)
    grey = grey or (False,) * groups
    x = torch.randn(groups, batch, 3, 32, 32)
    x[:, :, :, :6, :8] = 0.25
    images = native.ImageBatch.stack([xk[:, :1].expand(-1, 3, -1, -1) if g else xk for xk, g in zip(x, grey)])
    assert images.channels.tolist() == [1 if g else 3 for g in grey]
    return images


def _three_channels(x: native.ImageBatch) -> torch.Tensor:
    """[groups, batch, 3, 32, 32] float64, grey clients' channel repeated."""
    return torch.stack([x.client(k).double().expand(-1, 3, -1, -1) for k in range(x.groups)])


def _reference(x: native.ImageBatch, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch in float64: pooled [nch, B, 14, 14, G·6] and the argmax (flat 28×28 index) of every window."""
    images, groups, batch = _three_channels(x), x.groups, x.batch
    nch = w.shape[1] // 6
    conv = torch.stack([F.conv2d(images[g], w[g].double()) for g in range(groups)])  # [G, B, 6·nch, 28, 28]
    pooled, idx = F.max_pool2d_with_indices(conv.flatten(0, 1), 2)
    pooled = pooled.view(groups, batch, nch, 6, 14, 14).permute(2, 1, 4, 5, 0, 3).reshape(nch, batch, 14, 14, -1)
    idx = idx.view(groups, batch, nch, 6, 14, 14)[:, :, 0].permute(1, 3, 4, 0, 2).reshape(batch, 14, 14, -1)
    return pooled, idx


def _flat_index(arg: torch.Tensor) -> torch.Tensor:
    """The kernel's 2-bit argmax (2·dy + dx) [G, B, 14, 14, 6] as torch's flat index into the 28×28 convolution
    output, [B, 14, 14, G·6]."""
    ph = torch.arange(14).view(1, 14, 1, 1)
    pw = torch.arange(14).view(1, 1, 14, 1)
    groups, batch = arg.shape[:2]
    a = arg.permute(1, 2, 3, 0, 4).reshape(batch, 14, 14, groups * 6).long()
    return (2 * ph + a // 2) * 28 + 2 * pw + a % 2


def test_hand_computed_single_tap(lib: ctypes.CDLL) -> None:
    """A weight with one tap w[o=2, c=1, kh=2, kw=3] = 2 copies channel 1 shifted by (2, 3), times 2. On an image
    that grows along rows and columns every window's maximum is its bottom-right pixel (argmax 3)."""
    x = native.ImageBatch.stack([torch.arange(3 * 32 * 32, dtype=torch.float32).view(1, 3, 32, 32) / 1000])
    assert x.channels.tolist() == [3]
    w = torch.zeros(1, 6, 3, 5, 5)
    w[0, 2, 1, 2, 3] = 2.0
    pooled, arg = native.conv1_pool_forward(lib, x, w, argmax=True)
    ph, pw = torch.meshgrid(torch.arange(14), torch.arange(14), indexing="ij")
    expected = 2 * (1024 + (2 * ph + 1 + 2) * 32 + (2 * pw + 1 + 3)) / 1000
    torch.testing.assert_close(pooled[0, 0, :, :, 2], expected.float())
    assert torch.all(pooled[0, 0, :, :, [0, 1, 3, 4, 5]] == 0)
    assert torch.all(arg[0, 0, :, :, 2] == 3)
    assert torch.all(arg[0, 0, :, :, 0] == 0)  # all-zero windows: a tie, the first pixel wins as in torch


def test_grey_clients_are_stored_with_one_channel() -> None:
    grey = torch.rand(4, 1, 32, 32).expand(-1, 3, -1, -1)
    colour = grey.clone()
    colour[2, 1, 5, 7] += 0.5  # one pixel of one image
    x = native.ImageBatch.stack([grey, colour, grey])
    assert x.channels.tolist() == [1, 3, 1]
    assert x.offsets.tolist() == [0, 4 * 1024, 4 * 4 * 1024]
    assert torch.equal(x.client(0), grey[:, :1]) and torch.equal(x.client(1), colour)
    assert torch.equal(x.client(2), grey[:, :1])
    assert torch.all(x.buf[-native.PAD :] == 0)
    view = torch.rand(4, 1, 32, 32).expand(-1, 3, -1, -1)  # grey by construction: no comparison needed
    assert native.ImageBatch.stack([colour, view]).channels.tolist() == [3, 1]
    assert torch.equal(native.ImageBatch.stack([colour, view]).client(1), view[:, :1])
    with pytest.raises(ValueError, match=r"must be \[batch, 3, 32, 32\], got \[\(4, 3, 28, 28\)\]"):
        native.ImageBatch.stack([torch.rand(4, 3, 28, 28)])


@pytest.mark.parametrize(
    ("groups", "batch", "nch", "grey"),
    [
        (1, 1, 1, ()),
        (3, 5, 1, ()),
        (4, 3, 2, ()),
        (10, 2, 2, ()),
        (3, 5, 1, (True, True, True)),
        (4, 3, 2, (True, False, True, False)),
    ],
)
def test_forward_equals_torch(lib: ctypes.CDLL, groups: int, batch: int, nch: int, grey: tuple[bool, ...]) -> None:
    x = _images(groups, batch, grey=grey)
    w = torch.randn(groups, 6 * nch, 3, 5, 5) * 0.2
    pooled, arg = native.conv1_pool_forward(lib, x, w, argmax=True)
    ref, ref_idx = _reference(x, w)
    torch.testing.assert_close(pooled.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(_flat_index(arg), ref_idx)


@pytest.mark.parametrize(
    ("threads", "grey"),
    [(1, ()), (2, ()), (3, ()), (2, (True, True, True)), (2, (True, False, False)), (16, (True, False, False))],
)
def test_backward_equals_torch_autograd(lib: ctypes.CDLL, threads: int, grey: tuple[bool, ...]) -> None:
    """∂L/∂w and ∂L/∂b of L = Σ dp·relu(maxpool(conv(x, w)) + b), in float64 by torch's autograd."""
    groups, batch = 3, 4
    x = _images(groups, batch, seed=1, grey=grey)
    w = torch.randn(groups, 6, 3, 5, 5) * 0.2
    b = torch.randn(groups, 6) * 0.3 - 1.0  # pooled values are mostly positive: shift so relu cuts some
    dp = torch.randn(batch, 14, 14, groups * 6)
    _, arg = native.conv1_pool_forward(lib, x, w, argmax=True)
    w64, b64 = w.double().requires_grad_(True), b.double().requires_grad_(True)
    images = _three_channels(x)
    h = []
    for g in range(groups):
        h.append(F.relu(F.max_pool2d(F.conv2d(images[g], w64[g]), 2) + b64[g].view(1, 6, 1, 1)))  # [B, 6, 14, 14]
        (h[-1] * dp[:, :, :, 6 * g : 6 * g + 6].permute(0, 3, 1, 2).double()).sum().backward()
    h = torch.stack(h).permute(1, 3, 4, 0, 2).reshape(batch, 14, 14, groups * 6).float().detach()
    assert 0.1 < float((h > 0).float().mean()) < 0.9  # relu's mask matters
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        grad_w, grad_b = native.conv1_pool_backward(lib, x, dp, h, arg)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(grad_w.double(), w64.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad_b.double(), b64.grad, atol=1e-4, rtol=1e-5)


def test_padding_after_the_images_never_reaches_a_result(lib: ctypes.CDLL) -> None:
    """The kernel reads up to 4 floats past the last row; huge values there must change nothing."""
    x = _images(2, 2)
    w = torch.randn(2, 6, 3, 5, 5)
    clean, arg = native.conv1_pool_forward(lib, x, w, argmax=True)
    dp = torch.randn(2, 14, 14, 12)
    grads = native.conv1_pool_backward(lib, x, dp, clean[0].relu(), arg)
    x.buf[-native.PAD :] = 1e30
    dirty, _ = native.conv1_pool_forward(lib, x, w, argmax=True)
    assert torch.equal(clean, dirty)
    for before, after in zip(grads, native.conv1_pool_backward(lib, x, dp, clean[0].relu(), arg)):
        assert torch.equal(before, after)


def test_kernel_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_kernel("torch", torch.device("cpu")) == "torch"
    assert resolve_kernel("auto", torch.device("cpu")) == "native"
    assert resolve_kernel("auto", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="kernel: 'native' runs on the CPU only"):
        resolve_kernel("native", torch.device("cuda"))
    monkeypatch.setenv("SPMC_NATIVE", "0")
    native.load.cache_clear()
    try:
        assert resolve_kernel("auto", torch.device("cpu")) == "torch"
        with pytest.raises(RuntimeError, match="kernel: 'native' needs a working C compiler"):
            resolve_kernel("native", torch.device("cpu"))
    finally:
        native.load.cache_clear()


def test_require_returns_the_library_or_refuses(lib: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> None:
    assert native.require()._handle == lib._handle  # the same loaded library (an earlier test may clear the cache)
    monkeypatch.setenv("SPMC_NATIVE", "0")
    native.load.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="native kernel: not available"):
            native.require()
    finally:
        native.load.cache_clear()


def test_failed_build_falls_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setenv("SPMC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_compile", lambda *args: False)
    native.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="spmc.native"):
            assert native.load() is None
        assert "no working build of conv1_pool.c" in caplog.text
        small = {"dataset": "synthetic", "synthetic_train_size": 200, "synthetic_test_size": 20, "num_clients": 2}
        assert Simulation(make_experiment(**small)).engine.kernel == "torch"
    finally:
        native.load.cache_clear()


def test_builds_into_a_fresh_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPMC_CACHE_DIR", str(tmp_path))
    native.load.cache_clear()
    try:
        assert native.load() is not None
        assert len(list(tmp_path.glob("conv1_pool-*.so"))) == 1
    finally:
        native.load.cache_clear()


def test_self_test_passes_and_catches_a_wrong_kernel(lib: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> None:
    assert native.self_test(lib) is None
    right = native.conv1_pool_forward

    def off_by_a_bit(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor | None]:
        pooled, arg = right(*args, **kwargs)  # type: ignore[arg-type]
        return pooled + 1e-2, arg

    monkeypatch.setattr(native, "conv1_pool_forward", off_by_a_bit)
    assert native.self_test(lib) == "forward, client 0"


def test_a_kernel_that_fails_its_self_test_is_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(native, "self_test", lambda lib: "weight gradient")
    native.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="spmc.native"):
            assert native.load() is None
        assert "disagrees with torch (weight gradient)" in caplog.text
    finally:
        native.load.cache_clear()


@pytest.mark.parametrize("name", ["fmnist", "cifar10"])
@pytest.mark.parametrize("padding", [4, 0])
def test_native_augmentation_is_bit_exact(
    lib: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch, name: str, padding: int
) -> None:
    """Preprocessor.train through the C pass gives the torch pipeline's values bit for bit, with the same draws
    (the generators end in the same state)."""
    from spmc.data.registry import DATASETS
    from spmc.data.transforms import Preprocessor

    pre = Preprocessor(DATASETS[name], padding=padding)
    channels = 3 if name == "cifar10" else 1
    x01 = torch.rand(64, channels, 32, 32, generator=torch.Generator().manual_seed(1))
    x01[:3] = 0.0  # all-zero images: the padding's value equals the images'
    g_native, g_torch = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert pre._native_applies(x01, g_native)
    fast = pre.train(x01, g_native, grey_view=True)
    monkeypatch.setattr(Preprocessor, "_native_applies", lambda self, x, g: False)
    slow = pre.train(x01, g_torch, grey_view=True)
    assert torch.equal(fast, slow) and fast.shape == (64, 3, 32, 32)
    assert fast.stride() == slow.stride()
    assert torch.equal(torch.rand(3, generator=g_native), torch.rand(3, generator=g_torch))


@pytest.mark.parametrize("threads", [1, 2])
def test_second_block_backward_equals_torch_autograd(lib: ctypes.CDLL, threads: int) -> None:
    """∂L/∂a, ∂L/∂w, ∂L/∂b of L = Σ dh·relu(maxpool(conv(a, w)) + b) for 3 stacked clients, against float64 autograd
    (with float64's own pooling indices, which match float32's here: no near-ties in random data)."""
    groups, batch = 3, 4
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(batch, groups * 6, 14, 14, generator=gen).relu().contiguous(memory_format=torch.channels_last)
    w = torch.randn(groups, 16, 6, 5, 5, generator=gen) * 0.2
    b = torch.randn(groups, 16, generator=gen) * 0.3 - 0.5
    dh = torch.randn(batch, groups * 16, 5, 5, generator=gen)
    conv = F.conv2d(a, w.reshape(-1, 6, 5, 5), groups=groups)
    pooled, idx = F.max_pool2d_with_indices(conv, 2)
    h = (pooled + b.reshape(1, -1, 1, 1)).relu()
    assert 0.1 < float((h > 0).float().mean()) < 0.9
    a64, w64, b64 = (t.double().requires_grad_(True) for t in (a, w, b))
    ref = F.relu(F.max_pool2d(F.conv2d(a64, w64.reshape(-1, 6, 5, 5), groups=groups), 2) + b64.reshape(1, -1, 1, 1))
    (ref * dh.double()).sum().backward()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        da, dw, db = native.conv2_pool_backward(lib, a, w, dh, h, idx)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(da.double(), a64.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(dw.double(), w64.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(db.double(), b64.grad, atol=1e-4, rtol=1e-5)
    assert da.is_contiguous(memory_format=torch.channels_last)


def test_empty_thread_shares_and_nan_pooling_as_torch(lib: ctypes.CDLL) -> None:
    """More threads than images (empty work shares) give the same gradients; a NaN wins its pooling window, as in
    torch's max_pool2d."""
    x = _images(1, 1)
    w = torch.randn(1, 6, 3, 5, 5, generator=torch.Generator().manual_seed(5))
    dp = torch.randn(1, 14, 14, 6, generator=torch.Generator().manual_seed(6))
    pooled, arg = native.conv1_pool_forward(lib, x, w, argmax=True)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 8):
            torch.set_num_threads(threads)
            results.append(native.conv1_pool_backward(lib, x, dp, pooled[0].relu(), arg))
    finally:
        torch.set_num_threads(before)
    for one, many in zip(*results):
        torch.testing.assert_close(one, many)
    x.client(0)[0, 1, 10, 11] = float("nan")
    pooled, _ = native.conv1_pool_forward(lib, x, w, argmax=True)
    ref = F.max_pool2d(F.conv2d(x.client(0), w[0]), 2).permute(0, 2, 3, 1)
    assert torch.equal(pooled[0].isnan(), ref.isnan()) and int(ref.isnan().sum()) > 0


def test_stacked_predictions_equal_the_models(lib: ctypes.CDLL) -> None:
    """Evaluation's fast path (one stacked row, native first block) predicts what SimpleCNN predicts, on grey and
    coloured images, with a last partial batch."""
    from spmc.batched import stacked_predictions
    from spmc.models import SimpleCNN
    from spmc.params import ParamLayout
    from spmc.training import predictions

    torch.manual_seed(3)
    model = SimpleCNN()
    layout = ParamLayout.from_module(model)
    state = layout.flatten(model) * 4.0
    layout.load(model, state)
    x = torch.rand(37, 3, 32, 32)
    x[:20] = x[:20, :1].expand(-1, 3, -1, -1).clone()  # grey images: the kernel keeps one channel
    ref = predictions(model, x, 16)
    got = stacked_predictions(layout, state, x, 16)
    assert torch.equal(got, ref) and len(set(ref.tolist())) >= 3
    assert stacked_predictions(layout, state, x[:0], 16).shape == (0,)


def test_server_data_fast_path_equals_the_models_forward(lib: ctypes.CDLL) -> None:
    """Sageflow's ℓ and H through the stacked fast path equal the model's forward batch by batch (an independent
    loop here), with a random transform that both paths must see identically."""
    from spmc.batched import stacked_logits
    from spmc.defenses.server_data import ServerData
    from spmc.models import SimpleCNN
    from spmc.params import ParamLayout

    torch.manual_seed(5)
    model = SimpleCNN()
    layout = ParamLayout.from_module(model)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(70, 1, 32, 32, generator=g).expand(-1, 3, -1, -1)
    y = torch.randint(0, 10, (70,), generator=g)

    def noisy(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return xb + 0.1 * torch.rand(xb.shape[0], 1, 1, 1, generator=gen)

    slow = ServerData(x, y, noisy, model, layout, batch_size=16, seed=2)
    fast = ServerData(x, y, noisy, SimpleCNN(), layout, batch_size=16, seed=2)
    fast.logits = lambda state, images: stacked_logits(layout, state, images, 7)
    state = layout.flatten(model) * 3.0
    losses, entropies = [], []
    gen = torch.Generator().manual_seed((2 * 1_000_003 + 4) % (2**63))
    layout.load(model, state)
    model.eval()
    with torch.no_grad():
        for b in range(70 // 16):  # four full batches, the last partial one dropped
            logits = model(noisy(x[16 * b : 16 * (b + 1)], gen))
            losses.append(F.cross_entropy(logits, y[16 * b : 16 * (b + 1)]).item())
            logp = torch.log_softmax(logits.double(), 1)
            entropies.append(float(-(logp.exp() * logp).sum(1).mean()))
    expected = (sum(losses) / 4, sum(entropies) / 4)
    assert expected[1] > 0.1 and slow.logits is None
    assert slow.loss_and_entropy(state, 4) == pytest.approx(expected, rel=1e-5)
    assert fast.loss_and_entropy(state, 4) == pytest.approx(expected, rel=1e-5)
    assert fast.loss_and_entropy(state, 5) != pytest.approx(expected, rel=1e-5)  # another round, other noise


def test_server_data_takes_the_fast_path_where_evaluation_does(lib: ctypes.CDLL) -> None:
    """make_server_data gives the server data the stacked forward for a SimpleCNN on the CPU, not under
    kernel = torch."""
    from spmc.federation import Federation

    cfg = make_experiment(dataset="fmnist-sample", defense="sageflow", rounds=1)
    assert Federation.build(cfg).server_data().logits is not None
    torch_cfg = cfg.model_copy(update={"kernel": "torch"})
    assert Federation.build(torch_cfg).server_data().logits is None


def test_evaluation_is_the_same_with_either_kernel(lib: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> None:
    """A_t and ASR_t of one state with kernel = native (the stacked fast path) and torch (the model) agree."""
    from spmc import batched
    from spmc.federation import Federation, evaluate_state
    from spmc.training import predictions

    cfg = make_experiment(dataset="fmnist-sample", attack="badnets", rounds=1, kernel="native")
    fed = Federation.build(cfg)
    state = fed.initial_state + 0.3 * torch.randn(fed.initial_state.shape, generator=torch.Generator().manual_seed(0))
    calls = []
    real = batched.stacked_predictions
    monkeypatch.setattr(batched, "stacked_predictions", lambda *a: calls.append(1) or real(*a))
    fast = evaluate_state(fed.model, fed.layout, fed.data, cfg, state)
    assert len(calls) == 2  # the triggered set once (both ASRs), the test set once
    slow = evaluate_state(fed.model, fed.layout, fed.data, cfg.model_copy(update={"kernel": "torch"}), state)
    assert len(calls) == 2
    # the same classes to float rounding: a near-tie may flip one image on another CPU's rounding, not more
    one_image = {"accuracy": 100 / fed.data.test_y.numel(), "asr_all": 100 / fed.data.backdoor_y.numel()}
    one_image["asr"] = one_image["asr_all"]
    one_image["asr_excl_target"] = 100 / int(fed.data.backdoor_not_target.sum())
    assert all(abs(fast[k] - slow[k]) <= one_image[k] + 1e-9 for k in one_image) and fast.keys() == slow.keys()
    assert fast["asr_all"] != fast["asr_excl_target"]
    classes = predictions(fed.model, fed.data.test_x, 1000)
    assert len(set(classes.tolist())) >= 3  # not a constant model, whose metrics any path would get right


def test_other_models_and_the_torch_kernel_are_evaluated_by_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path is SimpleCNN's on the CPU only: ResNet-10 under kernel = auto, and SimpleCNN under
    kernel = torch, use the model's own forward pass."""
    from spmc import batched
    from spmc.federation import predictor
    from spmc.models import build_model
    from spmc.params import ParamLayout

    def refuse(*_: object) -> torch.Tensor:
        raise AssertionError("the stacked fast path was taken")

    monkeypatch.setattr(batched, "stacked_predictions", refuse)
    x = torch.rand(3, 3, 32, 32)
    for name, kernel in (("resnet10", "auto"), ("simplecnn", "torch")):
        model = build_model(name)
        layout = ParamLayout.from_module(model)
        cfg = make_experiment(dataset="synthetic", kernel=kernel, eval_batch_size=2)
        assert predictor(model, layout, cfg, layout.flatten(model))(x).shape == (3,)
