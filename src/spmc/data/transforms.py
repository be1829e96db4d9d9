"""Batch image transforms and the server split, as tensor operations on whole batches (spec §1.2).

The per-sample torchvision pipelines of the reference code map onto these functions:

- MNIST / Fashion-MNIST training: ``Resize((32, 32)) → RandomCrop(32, pad 4) → ToTensor → 1→3 channels →
  Normalize(0.1307, 0.3081)`` = :func:`to_unit_float` (once, at load) → :func:`random_crop` →
  :func:`to_three_channels` → :func:`normalize`.
- CIFAR-10 training: ``RandomCrop(32, pad 4, fill 0) → RandomHorizontalFlip(0.5) → ToTensor → Normalize`` =
  :func:`to_unit_float` → :func:`random_crop` → :func:`random_hflip` → :func:`normalize`.
- Test: the same without the random steps.

Zero padding is applied to [0, 1] images, before :func:`normalize`, which is what torchvision does when it
pads a PIL image with fill 0 before ``ToTensor``/``Normalize``.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from spmc import native
from spmc.data.registry import DatasetInfo

__all__ = [
    "Preprocessor",
    "normalize",
    "random_crop",
    "random_hflip",
    "server_split",
    "to_three_channels",
    "to_unit_float",
]


def to_unit_float(images: torch.Tensor, size: int = 32, chunk_size: int = 4096) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` → float32 ``[N, C, size, size]`` in [0, 1]: x / 255, then a bilinear resize.

    The resize (skipped when H = W = size) is
    ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` (spec §1.2, ``Resize((32, 32))``
    for MNIST/Fashion-MNIST). For the 28 → 32 upscaling it matches torchvision's PIL
    bilinear resize up to PIL's rounding of the result to uint8 (≤ 0.5/255 per pixel); antialiasing only
    matters when downscaling. Images are processed ``chunk_size`` at a time to bound the temporary memory.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"to_unit_float expects uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    if size < 1 or chunk_size < 1:
        raise ValueError(f"size and chunk_size must be >= 1, got size={size}, chunk_size={chunk_size}")
    n, c, h, w = images.shape
    out = torch.empty((n, c, size, size), dtype=torch.float32, device=images.device)
    for start in range(0, n, chunk_size):
        chunk = images[start : start + chunk_size].to(torch.float32).div_(255.0)
        if (h, w) != (size, size):
            chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        out[start : start + chunk_size] = chunk
    return out


def to_three_channels(x: torch.Tensor) -> torch.Tensor:
    """Copy a 1-channel batch ``[B, 1, H, W]`` to 3 channels (a copy, not a view); 3 channels pass through."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected a [B, 1 or 3, H, W] batch, got shape {tuple(x.shape)}")
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel standardisation ``(x[:, c] − mean[c]) / std[c]`` (torchvision ``Normalize``, spec §1.2)."""
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {x.shape[1]} channels")
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """RandomCrop(H×W, padding) on a batch, with an independent offset per sample (spec §1.2).

    out[b, :, i, j] = pad(x)[b, :, oy_b + i, ox_b + j], where pad(x) adds ``padding`` zeros on every side and
    oy_b, ox_b ~ U{0, …, 2·padding} are drawn from ``generator`` (first all oy, then all ox). ``padding = 0``
    returns ``x`` unchanged and draws nothing. Implemented as one ``torch.gather`` over the flattened padded
    images, no loop over samples.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return x
    b, c, h, w = x.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = F.pad(x, (padding, padding, padding, padding)).reshape(b, c, hp * wp)
    oy, ox = (o.to(x.device) for o in _crop_offsets(b, padding, generator))
    flat = (oy * wp + ox)[:, None] + _window(h, w, wp, x.device)  # [B, H·W]
    return padded.gather(2, flat.view(b, 1, h * w).expand(b, c, h * w)).reshape(b, c, h, w)


@functools.lru_cache(maxsize=16)
def _window(h: int, w: int, wp: int, device: torch.device) -> torch.Tensor:
    """Flat offsets i·wp + j of an h×w window in a row-major image of width wp (cached: one per shape)."""
    return (torch.arange(h, device=device)[:, None] * wp + torch.arange(w, device=device)[None, :]).reshape(-1)


def _crop_offsets(b: int, padding: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """RandomCrop's offsets oy, ox ~ U{0, …, 2·padding}, first all oy then all ox, on the generator's device."""
    span = 2 * padding + 1
    oy = torch.randint(0, span, (b,), generator=generator, device=generator.device)
    return oy, torch.randint(0, span, (b,), generator=generator, device=generator.device)


def _flip_draws(b: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Which samples RandomHorizontalFlip flips: u_b < p, u_b ~ U[0, 1), on the generator's device."""
    return torch.rand(b, generator=generator, device=generator.device) < p


def random_hflip(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Flip each sample left-right independently with probability ``p``: flip_b = (u_b < p), u_b ~ U[0, 1)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    flip = _flip_draws(x.shape[0], p, generator).to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


class Preprocessor:
    """The client-training and test pipelines of one dataset, on [0, 1] batches from :func:`to_unit_float`.

    ``train(x01, g)`` = random_crop(pad 4) → random_hflip(0.5) if ``info.hflip`` → to_three_channels →
    normalize; ``test(x01)`` = to_three_channels → normalize (spec §1.2). Outputs are contiguous float32
    ``[B, 3, H, W]`` (except ``train(..., grey_view=True)`` on grey images: a stride-0 view). For MNIST and
    Fashion-MNIST the server-validation transform is the training one (spec §1.2).
    """

    def __init__(self, info: DatasetInfo, *, padding: int = 4, flip_p: float = 0.5) -> None:
        self.info = info
        self.padding = padding
        self.flip_p = flip_p
        self.mean = info.mean
        self.std = info.std

    def _check(self, x01: torch.Tensor) -> None:
        if x01.ndim != 4 or x01.shape[1] not in (1, 3) or not x01.is_floating_point():
            raise ValueError(f"expected a float [B, 1 or 3, H, W] batch in [0, 1], got {x01.dtype} {tuple(x01.shape)}")

    def _finish(self, x: torch.Tensor, grey_view: bool = False) -> torch.Tensor:
        if x.shape[1] == 1 and len(set(self.mean)) == 1 and len(set(self.std)) == 1:
            # grey images with one mean/std: normalising before the copy to 3 channels gives the same values
            x = (x - self.mean[0]) / self.std[0]
            return x.expand(-1, 3, -1, -1) if grey_view else to_three_channels(x)
        return normalize(to_three_channels(x), self.mean, self.std).contiguous()

    def train(self, x01: torch.Tensor, generator: torch.Generator, *, grey_view: bool = False) -> torch.Tensor:
        """Augment and normalise a training batch (random crop, optional flip, 3 channels, Normalize).

        With ``grey_view``, a grey batch comes back as a read-only view of one channel expanded to 3 (stride 0;
        the same values without the copies; the batched engine's native kernel then reads one channel). Only for
        callers that never write into the batch.
        """
        self._check(x01)
        lib = native.load() if self._native_applies(x01, generator) else None
        if lib is not None:
            return self._train_native(lib, x01, generator, grey_view)
        x = random_crop(x01, self.padding, generator)
        if self.info.hflip:
            x = random_hflip(x, self.flip_p, generator)
        return self._finish(x, grey_view)

    def _native_applies(self, x01: torch.Tensor, generator: torch.Generator) -> bool:
        uniform = len(set(self.mean)) == 1 and len(set(self.std)) == 1
        return (
            x01.device.type == "cpu"
            and generator.device.type == "cpu"
            and x01.dtype == torch.float32
            and x01.shape[-1] <= 64
            and self.padding <= 16
            and 0.0 <= self.flip_p <= 1.0
            and (x01.shape[1] == 3 or uniform)
        )

    def _train_native(
        self, lib: ctypes.CDLL, x01: torch.Tensor, generator: torch.Generator, grey_view: bool
    ) -> torch.Tensor:
        """:meth:`train` in one pass of :func:`spmc.native.crop_flip_normalize`: the same random draws from
        ``generator`` in the same order (all oy, all ox, then the flips' u), the same values bit for bit."""
        b, c = x01.shape[:2]
        zero = torch.zeros(b, dtype=torch.long)
        oy, ox = _crop_offsets(b, self.padding, generator) if self.padding else (zero, zero)
        flip = _flip_draws(b, self.flip_p, generator) if self.info.hflip else None
        mean, std = (self.mean[:1], self.std[:1]) if c == 1 else (self.mean, self.std)
        x = native.crop_flip_normalize(lib, x01, oy, ox, flip, self.padding, mean, std)
        if c == 1:
            return x.expand(-1, 3, -1, -1) if grey_view else to_three_channels(x)
        return x

    def test(self, x01: torch.Tensor) -> torch.Tensor:
        """Normalise a test batch (3 channels, Normalize), no randomness."""
        self._check(x01)
        return self._finish(x01)

    def __repr__(self) -> str:
        return f"Preprocessor({self.info.name!r}, padding={self.padding}, hflip={self.info.hflip})"


def server_split(n: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Split the official training indices into the client pool and the server validation set (spec §1.2).

    N_tr = ⌊(1 − val_fraction)·n⌋ (computed as floor((1 − val_fraction)·n + 1e-9), so 0.9·60000 gives 54000
    despite floating-point error); pool = 0 … N_tr − 1, val = N_tr … n − 1, both int64 in official file order.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_tr = min(n, math.floor((1.0 - val_fraction) * n + 1e-9))
    return np.arange(n_tr, dtype=np.int64), np.arange(n_tr, n, dtype=np.int64)
