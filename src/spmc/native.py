"""Compiled CPU kernels for the batched engine's SimpleCNN and for the training augmentation (issue 4).

``csrc/conv1_pool.c`` holds:

- :func:`conv1_pool_forward` / :func:`conv1_pool_backward`: the first block, conv1 (3 → 6, 5×5) fused with
  max-pooling, bias and relu. oneDNN runs conv1 at about a third of the CPU's speed (it pads the 3 input and 6
  output channels of each client to blocks of 16) and writes the 28×28 convolution output only for max-pooling to
  read it back. The kernel vectorises along an output row and keeps each row pair in registers until it is
  pooled, so only the pooled values and a 2-bit argmax per window are stored; the backward pass rebuilds the
  convolution's output gradient from those, one image at a time. Grey clients (3 equal channels) convolve one
  channel with the channel-summed weights (:class:`ImageBatch`).
- :func:`conv2_pool_backward`: the second block's gradients as scatters from the pooled maxima.
- :func:`crop_flip_normalize`: random crop, flip and normalisation in one pass, bit-exact with the torch path.

It is compiled at first use with the system C compiler (``$CC``, else ``cc``/``gcc``; ``FLAG_SETS``) into
``$SPMC_CACHE_DIR`` (default ``~/.cache/spmc``), keyed by the source, the flags and the CPU, checked against torch
(:func:`self_test`) and called through ``ctypes``. With ``-fopenmp`` it links ``libgomp.so.1``, which the dynamic
loader resolves to the copy torch has already loaded, so a call runs on torch's own ``torch.get_num_threads()``
worker threads (separate Python threads were slower: torch's idle workers spin and take their cores). Where no
compiler works, or the self-test fails, or ``SPMC_NATIVE=0``, :func:`load` returns None and spmc uses torch's
kernels (``kernel = "auto"``). Results agree with the torch path to float rounding (the augmentation bit for bit).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "conv1_pool.c"
_O = ["-O3", "-fno-tree-loop-vectorize"]  # GCC 12.2's loop vectorizer miscompiled a masked copy for AVX-512
FLAG_SETS = ([*_O, "-march=native", "-fopenmp"], [*_O, "-fopenmp"], ["-O2"])
PAD = 16
"""Floats of finite padding the kernel may read past the last image."""

_P, _I = ctypes.c_void_p, ctypes.c_int


def cache_dir() -> Path:
    """Where compiled kernels live: ``$SPMC_CACHE_DIR``, else ``$XDG_CACHE_HOME/spmc`` or ``~/.cache/spmc``."""
    if os.environ.get("SPMC_CACHE_DIR"):
        return Path(os.environ["SPMC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spmc"


def _cpu_signature() -> str:
    """The CPU's model and feature flags (``-march=native`` output differs between CPUs)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(keep))


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def _compile(compiler: str, flags: list[str], target: Path) -> bool:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *flags, "-shared", "-fPIC", "-o", str(out), str(SOURCE)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            log.info("native kernel: %s failed: %s", " ".join(cmd), done.stderr.strip()[-500:])
            return False
        os.replace(out, target)  # atomic: parallel runs may compile the same kernel
    return True


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, compiling it if needed; None (logged) where that is not possible."""
    if os.environ.get("SPMC_NATIVE", "1") == "0":
        log.info("native kernel: disabled by SPMC_NATIVE=0")
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("native kernel: no C compiler found ($CC, cc, gcc); spmc uses torch's kernels instead (slower)")
        return None
    source = SOURCE.read_bytes()
    for flags in FLAG_SETS:  # the next, safer set where a build fails, will not load or fails its self-test
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), _cpu_signature().encode()]))
        target = cache_dir() / f"conv1_pool-{key.hexdigest()[:16]}.so"
        try:
            if not (target.exists() or _compile(compiler, flags, target)):
                continue
            lib = _declare(ctypes.CDLL(str(target)))
        except OSError as err:
            log.info("native kernel: cannot build or load %s: %s", target, err)
            continue
        problem = self_test(lib)
        if problem is None:
            log.info("native kernel: %s", target)
            return lib
        log.warning("native kernel: %s disagrees with torch (%s)", target, problem)
    log.warning("native kernel: no working build of %s; spmc uses torch's kernels instead (slower)", SOURCE.name)
    return None


def require() -> ctypes.CDLL:
    """The compiled kernel library (:func:`load`); RuntimeError where it is not available."""
    lib = load()
    if lib is None:
        raise RuntimeError("native kernel: not available (see the log of spmc.native)")
    return lib


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Argument types of the library's functions."""
    lib.conv1_pool_forward.argtypes = [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I]
    lib.conv1_pool_backward.argtypes = [_P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I]
    lib.stack_images.argtypes = [_P, _P, _P, _P, _P, _I, _I, _I]
    lib.crop_flip_normalize.argtypes = [_P, _I, _I, _I, _I, _P, _P, _P, _I, _P, _P, _P, _I]
    lib.conv2_pool_backward.argtypes = [_P, _P, _P, _P, _P, _P, _P, _I, _I, _I]
    for name in (
        "conv1_pool_forward",
        "conv1_pool_backward",
        "stack_images",
        "crop_flip_normalize",
        "conv2_pool_backward",
    ):
        getattr(lib, name).restype = None
    return lib


def self_test(lib: ctypes.CDLL) -> str | None:
    """Check a freshly loaded kernel against torch on a few images (a grey and a colour client, both passes of
    the first block, the second block's backward); returns what disagrees, or None. Guards against a miscompiling
    C compiler (one did: see ``FLAG_SETS``)."""
    gen = torch.Generator().manual_seed(0)
    grey = torch.rand(2, 1, 32, 32, generator=gen).expand(-1, 3, -1, -1)
    images = [grey, torch.rand(2, 3, 32, 32, generator=gen)]
    w = torch.randn(2, 6, 3, 5, 5, generator=gen)
    dp = torch.randn(2, 14, 14, 12, generator=gen)
    x = ImageBatch.stack(images, lib)
    pooled, arg = conv1_pool_forward(lib, x, w, argmax=True)
    if arg is None:
        return "forward's argmax"
    h = pooled[0].relu()
    grad_w, grad_b = conv1_pool_backward(lib, x, dp, h, arg)
    w64 = w.double().requires_grad_(True)
    for g, xg in enumerate(images):
        ref = F.max_pool2d(F.conv2d(xg.double(), w64[g]), 2)  # [2, 6, 14, 14]
        if not torch.allclose(ref.permute(0, 2, 3, 1).float(), pooled[0, :, :, :, 6 * g : 6 * g + 6], atol=1e-4):
            return f"forward, client {g}"
        mask = (h[..., 6 * g : 6 * g + 6] > 0).permute(0, 3, 1, 2)
        (ref * mask * dp[..., 6 * g : 6 * g + 6].permute(0, 3, 1, 2)).sum().backward()
    if w64.grad is None or not torch.allclose(grad_w.double(), w64.grad, atol=1e-3, rtol=1e-4):
        return "weight gradient"
    if not torch.allclose(grad_b, (dp * (h > 0)).view(2, 14, 14, 2, 6).sum(dim=(0, 1, 2)), atol=1e-4):
        return "bias gradient"
    a = torch.rand(2, 12, 14, 14, generator=gen).contiguous(memory_format=torch.channels_last)
    w2 = torch.randn(2, 16, 6, 5, 5, generator=gen)
    b2 = torch.randn(2, 16, generator=gen)
    pooled2, idx = F.max_pool2d_with_indices(F.conv2d(a, w2.reshape(32, 6, 5, 5), groups=2), (2, 2))
    h2 = (pooled2 + b2.reshape(1, -1, 1, 1)).relu()
    dh = torch.randn(2, 32, 5, 5, generator=gen)
    a64, w64 = a.double().requires_grad_(True), w2.double().requires_grad_(True)
    ref2 = F.max_pool2d(F.conv2d(a64, w64.reshape(32, 6, 5, 5), groups=2), 2)
    (ref2 * (h2 > 0) * dh).sum().backward()
    got = conv2_pool_backward(lib, a, w2, dh, h2, idx)
    if (
        a64.grad is None
        or w64.grad is None
        or not torch.allclose(got[0].double(), a64.grad, atol=1e-3)
        or not torch.allclose(got[1].double(), w64.grad, atol=1e-3)
    ):
        return "second block's backward"
    if not torch.allclose(got[2], (dh * (h2 > 0)).sum(dim=(0, 2, 3)).view(2, 16), atol=1e-4):
        return "second block's bias gradient"
    batch = torch.rand(3, 3, 32, 32, generator=gen)
    oy, ox = torch.tensor([0, 4, 8]), torch.tensor([8, 0, 3])
    flip = torch.tensor([True, False, True])
    crop = crop_flip_normalize(lib, batch, oy, ox, flip, 4, (0.1, 0.2, 0.3), (0.5, 0.6, 0.7))
    padded = F.pad(batch, (4, 4, 4, 4))
    want = torch.stack([padded[i, :, int(oy[i]) : int(oy[i]) + 32, int(ox[i]) : int(ox[i]) + 32] for i in range(3)])
    want = torch.where(flip.view(3, 1, 1, 1), want.flip(-1), want)
    want = (want - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.6, 0.7]).view(1, 3, 1, 1)
    if not torch.equal(crop, want):
        return "augmentation"
    return None


@dataclass(frozen=True)
class ImageBatch:
    """One mini-batch per client as the kernel reads it: client k's [batch, channels[k], 32, 32] float32 images from
    ``buf[offsets[k]]`` on, all in one flat buffer followed by :data:`PAD` zeros.

    ``channels[k]`` is 1 where client k's images are grey (3 equal channels): the kernel then convolves its one
    channel with the weights summed over the channels, conv(x·1₃, w) = conv(x, Σ_c w_c), a third of the work.
    """

    buf: torch.Tensor
    offsets: torch.Tensor
    channels: torch.Tensor
    batch: int

    @classmethod
    def stack(cls, images: Sequence[torch.Tensor], lib: ctypes.CDLL | None = None) -> ImageBatch:
        """Client k's batch ``images[k]`` [batch, 3, 32, 32], stored with one channel where it is grey: expanded
        from one channel (stride 0, as :meth:`spmc.data.Preprocessor.train` gives with ``grey_view``), or three
        channels equal bit for bit in every image (checked in C, stopping at the first difference)."""
        shape = tuple(images[0].shape)
        if len(shape) != 4 or shape[1:] != (3, 32, 32) or any(tuple(x.shape) != shape for x in images):
            got = [tuple(x.shape) for x in images]
            raise ValueError(f"native kernel: every client's images must be [batch, 3, 32, 32], got {got}")
        lib = lib or require()
        groups, batch = len(images), shape[0]
        # a batch expanded from one channel (stride 0) is grey by construction: only that channel is read
        src = [(x[:, :1] if x.stride(1) == 0 else x).detach().to(torch.float32).contiguous() for x in images]
        src_channels = torch.tensor([x.shape[1] for x in src], dtype=torch.int32)
        buf = torch.empty(groups * batch * 3 * 32 * 32 + PAD, dtype=torch.float32, device=images[0].device)
        offsets = torch.empty(groups, dtype=torch.long)
        channels = torch.empty(groups, dtype=torch.int32)
        pointers = (ctypes.c_void_p * groups)(*[x.data_ptr() for x in src])
        lib.stack_images(
            pointers,
            src_channels.data_ptr(),
            buf.data_ptr(),
            offsets.data_ptr(),
            channels.data_ptr(),
            groups,
            batch,
            torch.get_num_threads(),
        )
        used = int(offsets[-1]) + batch * int(channels[-1]) * 32 * 32
        buf[used : used + PAD].zero_()
        return cls(buf[: used + PAD], offsets, channels, batch)

    @property
    def groups(self) -> int:
        return int(self.channels.shape[0])

    @property
    def grey(self) -> torch.Tensor:
        """[groups] bool: which clients' images are stored with one channel."""
        return self.channels == 1

    def client(self, k: int) -> torch.Tensor:
        """Client k's images as stored, [batch, channels[k], 32, 32]."""
        c = int(self.channels[k])
        start = int(self.offsets[k])
        return self.buf[start : start + self.batch * c * 32 * 32].view(self.batch, c, 32, 32)


def conv1_pool_forward(
    lib: ctypes.CDLL, x: ImageBatch, w: torch.Tensor, argmax: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """pooled[k] = maxpool₂(conv(x_g, w_g[6k:6k+6])) for every client g, without bias.

    ``w`` is [groups, 6·nch, 3, 5, 5]. Returns pooled [nch, batch, 14, 14, groups·6] (so
    ``pooled[k].permute(0, 3, 1, 2)`` is [batch, groups·6, 14, 14] in channels_last) and, when ``argmax``, the
    uint8 argmax of block 0 (2·dy + dx in each 2×2 window; [groups, batch, 14, 14, 6]) that the backward pass
    needs.
    """
    grey = x.grey
    if bool(grey.any()):
        w = w.clone()
        w[grey, :, 0] = w[grey].sum(dim=2)
    w = w.to(torch.float32).contiguous()
    nch = w.shape[1] // 6
    out = torch.empty(nch, x.batch, 14, 14, x.groups * 6, dtype=torch.float32)
    arg = torch.empty(x.groups, x.batch, 14, 14, 6, dtype=torch.uint8) if argmax else None
    ptrs = (x.buf.data_ptr(), x.offsets.data_ptr(), x.channels.data_ptr(), w.data_ptr(), out.data_ptr())
    lib.conv1_pool_forward(
        *ptrs, arg.data_ptr() if arg is not None else None, x.groups, x.batch, nch, torch.get_num_threads()
    )
    return out, arg


def conv1_pool_backward(
    lib: ctypes.CDLL, x: ImageBatch, grad: torch.Tensor, h: torch.Tensor, arg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """∂L/∂w [groups, 6, 3, 5, 5] and ∂L/∂b [groups, 6] of h = relu(pooled block 0 + b).

    ``grad`` = ∂L/∂h and ``h`` are [batch, 14, 14, groups·6]; ``arg`` is the forward's argmax. With
    δ = ∂L/∂h·[h > 0]: ∂L/∂b = Σ δ over batch and space, and ∂L/∂w is the convolution's weight gradient of δ placed
    at each window's argmax (for a grey client the same for each of the 3 input channels).
    """
    grad, h = grad.to(torch.float32).contiguous(), h.to(torch.float32).contiguous()
    threads = torch.get_num_threads()
    partial = torch.zeros(threads, x.groups, 456, dtype=torch.float32)
    delta = torch.empty(x.groups, x.batch, 14, 14, 6, dtype=torch.float32)
    ptrs = (x.buf.data_ptr(), x.offsets.data_ptr(), x.channels.data_ptr(), grad.data_ptr(), h.data_ptr())
    lib.conv1_pool_backward(*ptrs, arg.data_ptr(), delta.data_ptr(), partial.data_ptr(), x.groups, x.batch, threads)
    total = partial.sum(dim=0) if threads > 1 else partial[0]
    grad_w = total[:, :450].reshape(x.groups, 6, 3, 5, 5)
    grey = x.grey
    if bool(grey.any()):
        grad_w[grey] = grad_w[grey][:, :, :1].expand(-1, -1, 3, -1, -1)
    return grad_w, total[:, 450:]


def crop_flip_normalize(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    oy: torch.Tensor,
    ox: torch.Tensor,
    flip: torch.Tensor | None,
    padding: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Random crop (zero padding ``padding``, offsets ``oy``, ``ox``), optional horizontal flip, then
    (x − mean[c]) / std[c], of a [B, C, H, W] float32 batch in [0, 1], in one pass; bit for bit what
    :func:`spmc.data.transforms.random_crop`, ``random_hflip`` and ``normalize`` give for the same draws."""
    b, c, h, w = x.shape
    if w > 64 or padding > 16 or len(mean) != c or len(std) != c:
        raise ValueError(f"crop_flip_normalize: needs W <= 64, padding <= 16, C means/stds; got {tuple(x.shape)}")
    x = x.to(torch.float32).contiguous()
    oy, ox = oy.to(torch.long).contiguous(), ox.to(torch.long).contiguous()
    flags = flip.to(torch.uint8).contiguous() if flip is not None else None
    m = torch.tensor(mean, dtype=torch.float32)
    s = torch.tensor(std, dtype=torch.float32)
    out = torch.empty_like(x)
    lib.crop_flip_normalize(
        x.data_ptr(),
        b,
        c,
        h,
        w,
        oy.data_ptr(),
        ox.data_ptr(),
        flags.data_ptr() if flags is not None else None,
        padding,
        m.data_ptr(),
        s.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def conv2_pool_backward(
    lib: ctypes.CDLL, a: torch.Tensor, w: torch.Tensor, grad: torch.Tensor, h: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """∂L/∂a [B, G·6, 14, 14] (channels_last), ∂L/∂w [G, 16, 6, 5, 5] and ∂L/∂b [G, 16] of SimpleCNN's second
    block h = relu(maxpool₂(conv(a, w)) + b) for G clients, from ``grad`` = ∂L/∂h, ``h`` and max-pooling's flat
    indices ``idx`` (all [B, G·16, 5, 5]). Only each window's maximum gets a gradient, so both are scatters of
    δ = ∂L/∂h·[h > 0]: ∂L/∂a[c, y + i, x + j] += δ·w[o, c, i, j] and ∂L/∂w[o, c, i, j] += δ·a[c, y + i, x + j]
    for the maximum (y, x) of each window of channel o."""
    groups, batch = w.shape[0], a.shape[0]
    cl = torch.channels_last
    a, grad, h = (t.to(torch.float32).contiguous(memory_format=cl) for t in (a, grad, h))
    idx = idx.contiguous(memory_format=cl)
    wt = torch.zeros(groups, 16, 5, 32, dtype=torch.float32)
    wt[..., :30] = w.permute(0, 1, 3, 4, 2).reshape(groups, 16, 5, 30)  # [g, o, kh, kw·6 + c]
    da = torch.empty(batch, groups * 6, 14, 14, dtype=torch.float32, memory_format=cl)
    threads = torch.get_num_threads()
    partial = torch.zeros(threads, groups, 16 * 5 * 32 + 16, dtype=torch.float32)
    ptrs = (a.data_ptr(), wt.data_ptr(), grad.data_ptr(), h.data_ptr(), idx.data_ptr(), da.data_ptr())
    lib.conv2_pool_backward(*ptrs, partial.data_ptr(), groups, batch, threads)
    total = partial.sum(dim=0) if threads > 1 else partial[0]
    grad_w = total[:, : 16 * 5 * 32].view(groups, 16, 5, 32)[..., :30].reshape(groups, 16, 5, 5, 6)
    return da, grad_w.permute(0, 1, 4, 2, 3).contiguous(), total[:, 16 * 5 * 32 :]
