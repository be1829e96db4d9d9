"""The CIFAR-10 server-validation strong augmentation (spec §1.2) as batch tensor operations."""

from __future__ import annotations

import colorsys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc.data.registry import CIFAR10_MEAN, CIFAR10_STD
from spmc.data.strong_aug import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    hsv_to_rgb,
    random_resized_crop_params,
    resized_crop,
    rgb_to_grayscale,
    rgb_to_hsv,
    strong_augment,
)
from spmc.data.transforms import normalize

MEAN, STD = CIFAR10_MEAN, CIFAR10_STD
PLAIN = {"flip_p": 0.0, "jitter_p": 0.0, "grayscale_p": 0.0}


def images(b: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def test_shape_range_and_finite_values() -> None:
    x = torch.cat([images(14), torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32)])
    out = strong_augment(x, torch.Generator().manual_seed(1), MEAN, STD)
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
    assert bool(torch.isfinite(out).all())
    raw = unnormalize(out)
    assert float(raw.min()) >= -1e-5 and float(raw.max()) <= 1 + 1e-5


def test_same_generator_state_same_output_other_seed_differs() -> None:
    x = images()
    a = strong_augment(x, torch.Generator().manual_seed(5), MEAN, STD)
    b = strong_augment(x, torch.Generator().manual_seed(5), MEAN, STD)
    c = strong_augment(x, torch.Generator().manual_seed(6), MEAN, STD)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("ratio", [(3 / 4, 4 / 3), (1.0, 1.0)])
def test_full_scale_without_flip_jitter_or_gray_is_the_identity(ratio: tuple[float, float]) -> None:
    x = images()
    out = strong_augment(x, torch.Generator().manual_seed(0), MEAN, STD, scale=(1.0, 1.0), ratio=ratio, **PLAIN)
    assert torch.allclose(out, normalize(x, MEAN, STD), atol=1e-5)


def test_full_scale_with_certain_flip_is_the_mirror_image() -> None:
    x = images()
    kw = {**PLAIN, "flip_p": 1.0}
    out = strong_augment(x, torch.Generator().manual_seed(0), MEAN, STD, scale=(1.0, 1.0), **kw)
    assert torch.allclose(out, normalize(x.flip(-1), MEAN, STD), atol=1e-5)


def test_one_channel_input_becomes_three_equal_channels() -> None:
    x = images()[:, :1]
    out = unnormalize(strong_augment(x, torch.Generator().manual_seed(0), MEAN, STD, scale=(1.0, 1.0), **PLAIN))
    assert torch.allclose(out, x.expand(-1, 3, -1, -1), atol=1e-5)


def test_certain_grayscale_gives_equal_channels() -> None:
    x = images()
    kw = {**PLAIN, "grayscale_p": 1.0, "jitter_p": 1.0}
    raw = unnormalize(strong_augment(x, torch.Generator().manual_seed(3), MEAN, STD, **kw))
    assert torch.allclose(raw[:, 0], raw[:, 1], atol=1e-5) and torch.allclose(raw[:, 1], raw[:, 2], atol=1e-5)


def test_grayscale_probability_is_about_p() -> None:
    x = images(400)
    raw = unnormalize(strong_augment(x, torch.Generator().manual_seed(0), MEAN, STD, grayscale_p=0.2, jitter_p=0.0))
    gray = ((raw[:, 0] - raw[:, 1]).abs().amax(dim=(1, 2)) < 1e-5).float().mean()
    assert 0.13 < float(gray) < 0.27


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), size=st.sampled_from([32, 20]))
def test_resized_crop_equals_interpolate_of_the_crop(seed: int, size: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 3, 32, 32, generator=g)
    top, left, h, w = random_resized_crop_params(4, 32, 32, g)
    out = resized_crop(x, top, left, h, w, size)
    for k in range(4):
        t, lf, hh, ww = int(top[k]), int(left[k]), int(h[k]), int(w[k])
        crop = x[k : k + 1, :, t : t + hh, lf : lf + ww]
        ref = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
        assert torch.allclose(out[k : k + 1], ref, atol=1e-5)


def test_crop_params_respect_scale_ratio_and_bounds() -> None:
    top, left, h, w = random_resized_crop_params(2000, 32, 32, torch.Generator().manual_seed(0))
    assert bool(((top >= 0) & (left >= 0) & (top + h <= 32) & (left + w <= 32) & (h >= 1) & (w >= 1)).all())
    frac = (h * w).double() / 1024
    # round() moves each side by ≤ 0.5 pixel, so the area can leave [0.2, 1] by a little.
    assert float(frac.min()) > 0.17 and float(frac.max()) <= 1.0
    aspect = w.double() / h.double()
    assert float(aspect.min()) > 0.7 and float(aspect.max()) < 1.43
    assert 0.5 < float(frac.mean()) < 0.65  # E[U(0.2, 1)] = 0.6 before rejection
    assert float(torch.unique(top).numel()) > 10 and float(torch.unique(left).numel()) > 10


def test_hsv_matches_colorsys_and_round_trips() -> None:
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[0, :, 0, 0] = torch.tensor([0.3, 0.3, 0.3])  # gray
    x[0, :, 0, 1] = torch.tensor([0.0, 0.0, 0.0])  # black
    x[0, :, 0, 2] = torch.tensor([0.5, 0.5, 0.1])  # r = g max
    hsv = rgb_to_hsv(x)
    for b, i, j in [(0, 0, 0), (0, 0, 1), (0, 0, 2), (1, 3, 4), (1, 2, 6), (0, 4, 0)]:
        expected = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
        assert hsv[b, :, i, j].tolist() == pytest.approx(expected, abs=1e-12)
    assert torch.allclose(hsv_to_rgb(hsv), x, atol=1e-12)


def test_hue_shift_by_a_third_turns_red_into_green() -> None:
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert adjust_hue(red, torch.tensor([1 / 3])).flatten().tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-6)
    x = images(4)
    assert torch.allclose(adjust_hue(x, torch.zeros(4)), x, atol=1e-6)


def test_brightness_contrast_saturation_formulas() -> None:
    x = images(2) * 0.5
    assert torch.allclose(adjust_brightness(x, torch.tensor([0.5, 1.5])), x * torch.tensor([0.5, 1.5]).view(2, 1, 1, 1))
    flat = adjust_contrast(x, torch.zeros(2))
    assert torch.allclose(flat, rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), atol=1e-6)
    assert torch.allclose(adjust_saturation(x, torch.zeros(2)), rgb_to_grayscale(x).expand_as(x), atol=1e-6)
    assert torch.allclose(adjust_contrast(x, torch.ones(2)), x) and torch.allclose(
        adjust_saturation(x, torch.ones(2)), x
    )


def test_jitter_applies_the_drawn_operations_in_each_samples_order() -> None:
    x = images(12)
    out = color_jitter(x, torch.Generator().manual_seed(9), (0.4, 0.4, 0.4, 0.1), p=0.8)
    g = torch.Generator().manual_seed(9)
    applied = torch.rand(12, generator=g, dtype=torch.float64) < 0.8
    u = torch.rand(12, 4, generator=g, dtype=torch.float64)
    order = torch.rand(12, 4, generator=g, dtype=torch.float64).argsort(dim=1)
    fns = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
    factors = torch.cat([0.6 + 0.8 * u[:, :3], -0.1 + 0.2 * u[:, 3:]], dim=1)
    assert 0 < int(applied.sum()) < 12
    for b in range(12):
        y = x[b : b + 1]
        if applied[b]:
            for k in order[b].tolist():
                y = fns[k](y, factors[b, k : k + 1])
        assert torch.allclose(out[b : b + 1], y, atol=1e-6)


def test_zero_strength_jitter_is_the_identity() -> None:
    x = images(4)
    assert torch.equal(color_jitter(x, torch.Generator().manual_seed(0), (0.0, 0.0, 0.0, 0.0), p=1.0), x)


def test_invalid_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="float"):
        strong_augment(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), g, MEAN, STD)
    with pytest.raises(ValueError, match="scale"):
        random_resized_crop_params(2, 32, 32, g, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="hue"):
        color_jitter(images(2), g, (0.4, 0.4, 0.4, 0.7))
