"""The CIFAR-10 server-validation "strong" augmentation (spec §1.2, D38) as batch tensor operations.

The reference pipeline, applied per PIL image, is

    RandomResizedCrop(32, scale=(0.2, 1.0)) → RandomHorizontalFlip(0.5)
    → RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8) → RandomGrayscale(0.2) → ToTensor → Normalize.

:func:`strong_augment` does the same on a float ``[B, C, H, W]`` batch in [0, 1], each sample with its own draws:

- **Resized crop** (:func:`random_resized_crop_params`, :func:`resized_crop`): torchvision's parameter rule (10
  attempts of area ∼ U(scale)·H·W and log-aspect ∼ U(log ratio), w = round(√(area·r)), h = round(√(area/r)), the first
  that fits; else the whole image, centre-cropped to the ratio range), then a bilinear resize of the crop to
  ``size``×``size`` equal to ``F.interpolate(crop, mode="bilinear", align_corners=False)`` (done for the whole batch
  with one ``F.grid_sample``, source coordinates clamped to the crop). The reference resizes uint8 PIL images, so
  results agree up to PIL's rounding.
- **Flip**: :func:`spmc.data.transforms.random_hflip`.
- **Colour jitter**, applied to a sample with probability ``jitter_p``: brightness, contrast, saturation factors
  ∼ U[max(0, 1 − v), 1 + v], hue shift ∼ U[−h, h], the four operations in an order drawn **per sample** (torchvision
  draws a random permutation per image; here each sample gets its own permutation too). The operations are
  torchvision's tensor ones: brightness x·f; contrast f·x + (1 − f)·mean(gray(x)); saturation f·x + (1 − f)·gray(x),
  each clamped to [0, 1]; hue via RGB → HSV, h ← (h + shift) mod 1, HSV → RGB. An operation whose strength is 0 is
  skipped, as in torchvision.
- **Grayscale** with probability ``grayscale_p``: gray = 0.2989 R + 0.587 G + 0.114 B copied to 3 channels.
- **Normalize** with the given mean and std.

All random numbers come from ``generator`` (on its own device) in a fixed order, so the output depends only on the
generator's state and the batch; one-channel batches are copied to 3 channels first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from spmc.data.transforms import normalize, random_hflip, to_three_channels

__all__ = [
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "color_jitter",
    "hsv_to_rgb",
    "random_grayscale",
    "random_resized_crop_params",
    "resized_crop",
    "rgb_to_grayscale",
    "rgb_to_hsv",
    "strong_augment",
]

_ATTEMPTS = 10


def _rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """U[0, 1) float64 draws on the generator's device, moved to ``device``."""
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64).to(device)


def random_resized_crop_params(
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, h, w) int64 ``[batch]``: torchvision ``RandomResizedCrop.get_params`` for every sample.

    Draws ``[batch, 10]`` area fractions, ``[batch, 10]`` log-aspect fractions and ``[batch]`` top and left
    fractions, always the same amount, whatever is accepted.
    """
    if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], got {scale}, {ratio}")
    device = torch.device(device)
    area = height * width
    u_area = _rand((batch, _ATTEMPTS), generator, device)
    u_ratio = _rand((batch, _ATTEMPTS), generator, device)
    u_top = _rand((batch,), generator, device)
    u_left = _rand((batch,), generator, device)
    target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w_try = torch.round(torch.sqrt(target * aspect)).long()
    h_try = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w_try > 0) & (w_try <= width) & (h_try > 0) & (h_try <= height)
    found = fits.any(dim=1)
    first = fits.long().argmax(dim=1, keepdim=True)
    w = w_try.gather(1, first).squeeze(1)
    h = h_try.gather(1, first).squeeze(1)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(height * ratio[1])), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, fw)
    h = torch.where(found, h, fh)
    top = torch.where(found, torch.floor(u_top * (height - h + 1)).long(), (height - fh) // 2)
    left = torch.where(found, torch.floor(u_left * (width - w + 1)).long(), (width - fw) // 2)
    return top, left, h, w


def resized_crop(
    x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: torch.Tensor, w: torch.Tensor, size: int
) -> torch.Tensor:
    """Crop sample b to rows top_b … top_b + h_b − 1, columns left_b … left_b + w_b − 1, and resize it bilinearly
    to ``size``×``size``; equal to ``F.interpolate(crop, (size, size), mode="bilinear", align_corners=False)``."""
    b, _, height, width = x.shape
    out_idx = torch.arange(size, device=x.device, dtype=torch.float64) + 0.5

    def axis(start: torch.Tensor, length: torch.Tensor, full: int) -> torch.Tensor:
        length = length.to(x.device, torch.float64)[:, None]
        src = (out_idx[None, :] * length / size - 0.5).clamp(min=0.0)
        src = torch.minimum(src, length - 1) + start.to(x.device, torch.float64)[:, None]
        return (2.0 * src + 1.0) / full - 1.0  # grid_sample's coordinate for align_corners=False

    gy = axis(top, h, height)
    gx = axis(left, w, width)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` → ``[B, 1, H, W]``: 0.2989 R + 0.587 G + 0.114 B (torchvision's tensor weights)."""
    r, g, b = x.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _per_sample(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return f.to(x.device, x.dtype).view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """clamp(f_b · x_b, 0, 1)."""
    return (_per_sample(factor, x) * x).clamp(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """clamp(f_b · x_b + (1 − f_b) · m_b, 0, 1), m_b the mean of the grayscale image b."""
    f = _per_sample(factor, x)
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return (f * x + (1.0 - f) * mean).clamp(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """clamp(f_b · x_b + (1 − f_b) · gray(x_b), 0, 1)."""
    f = _per_sample(factor, x)
    return (f * x + (1.0 - f) * rgb_to_grayscale(x)).clamp(0.0, 1.0)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` RGB in [0, 1] → HSV with every channel in [0, 1] (h = 0 and s = 0 for grays)."""
    r, g, b = x.unbind(dim=1)
    maxc = x.amax(dim=1)
    minc = x.amin(dim=1)
    delta = maxc - minc
    gray = delta == 0
    safe = torch.where(gray, torch.ones_like(delta), delta)
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    h_r = ((g - b) / safe) % 6.0
    h_g = (b - r) / safe + 2.0
    h_b = (r - g) / safe + 4.0
    h = torch.where(maxc == r, h_r, torch.where(maxc == g, h_g, h_b))
    h = torch.where(gray, torch.zeros_like(h), h / 6.0) % 1.0
    return torch.stack((h, s, maxc), dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`: sector i = ⌊6h⌋ mod 6, p = v(1 − s), q = v(1 − sf), t = v(1 − s(1 − f))."""
    h, s, v = x.unbind(dim=1)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = (i.long() % 6).unsqueeze(1)
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    channels = [
        torch.stack(options, dim=1).gather(1, i)
        for options in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))
    ]
    return torch.cat(channels, dim=1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of sample b by shift_b (in turns, |shift| ≤ 0.5) through HSV."""
    hsv = rgb_to_hsv(x)
    h = (hsv[:, 0] + shift.to(x.device, x.dtype).view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(torch.cat([h.unsqueeze(1), hsv[:, 1:]], dim=1))


def color_jitter(
    x: torch.Tensor,
    generator: torch.Generator,
    strength: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
    p: float = 0.8,
) -> torch.Tensor:
    """``RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p)`` per sample, own order per sample.

    Draws ``[B]`` apply fractions, ``[B, 4]`` factor fractions and ``[B, 4]`` order keys (argsort → permutation).
    """
    brightness, contrast, saturation, hue = strength
    if min(brightness, contrast, saturation) < 0 or not 0 <= hue <= 0.5 or not 0.0 <= p <= 1.0:
        raise ValueError(f"color_jitter needs strengths >= 0, hue in [0, 0.5] and p in [0, 1]; got {strength}, {p}")
    b = x.shape[0]
    applied = _rand((b,), generator, x.device) < p
    u = _rand((b, 4), generator, x.device)
    order = _rand((b, 4), generator, x.device).argsort(dim=1)
    ops: list[tuple[int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor]] = []
    for k, (value, fn) in enumerate(
        ((brightness, adjust_brightness), (contrast, adjust_contrast), (saturation, adjust_saturation))
    ):
        if value > 0:
            lo = max(0.0, 1.0 - value)
            ops.append((k, fn, lo + (1.0 + value - lo) * u[:, k]))
    if hue > 0:
        ops.append((3, adjust_hue, -hue + 2.0 * hue * u[:, 3]))
    for step in range(4):
        for k, adjust, factor in ops:
            sel = (applied & (order[:, step] == k)).view(-1, 1, 1, 1)
            x = torch.where(sel, adjust(x, factor), x)
    return x


def random_grayscale(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace sample b by its grayscale image on all 3 channels with probability ``p`` (one ``[B]`` draw)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    sel = (_rand((x.shape[0],), generator, x.device) < p).view(-1, 1, 1, 1)
    return torch.where(sel, rgb_to_grayscale(x).expand_as(x), x)


def strong_augment(
    x01: torch.Tensor,
    generator: torch.Generator,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    size: int = 32,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
) -> torch.Tensor:
    """The strong augmentation of spec §1.2 on a float ``[B, 1 or 3, H, W]`` batch in [0, 1], then Normalize.

    Returns a contiguous ``[B, 3, size, size]`` batch in the input's dtype. Draw order: crop, flip, jitter, grayscale.
    """
    if x01.ndim != 4 or x01.shape[1] not in (1, 3) or not x01.is_floating_point():
        raise ValueError(f"expected a float [B, 1 or 3, H, W] batch in [0, 1], got {x01.dtype} {tuple(x01.shape)}")
    x = to_three_channels(x01)
    b, _, height, width = x.shape
    top, left, h, w = random_resized_crop_params(b, height, width, generator, scale, ratio, x.device)
    x = resized_crop(x, top, left, h, w, size)
    x = random_hflip(x, flip_p, generator)
    x = color_jitter(x, generator, jitter, jitter_p)
    x = random_grayscale(x, grayscale_p, generator)
    return normalize(x, mean, std).contiguous()
