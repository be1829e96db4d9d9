"""A small synthetic 10-class image dataset for tests and quick runs (registry name ``"synthetic"``).

The 28×28 image is a 3×3 grid of 8×8-pixel cells (9-pixel pitch). Class c has a fixed binary code
b_c ∈ {0, 1}⁸ for the eight cells other than the top-left one; the codes have 3 to 5 lit cells and differ
pairwise in at least 3 cells. Its prototype P_c is 1 on the lit cells and 0 elsewhere. A sample of class c is

    x = clip(a · shift(P_c, dy, dx) + ε, 0, 1) · 255,
    a ~ U[0.7, 1],  dy, dx ~ U{−2, …, 2},  ε ~ N(0, 0.08²) per pixel,

stored as uint8 ``[N, 1, 28, 28]`` like MNIST. The codes depend only on a fixed constant (the task is the same
for every seed); the labels, amplitudes, shifts and noise depend on ``seed``. The cells are large enough to
survive the ±4-pixel RandomCrop of training: a SimpleCNN trained with the paper's optimiser (SGD 0.01,
momentum 0.9, batch 64) on 2,000 samples typically passes 80 % test accuracy in 3-4 epochs, once it leaves the
usual initial plateau of that network. The top-left cell is never lit, so the top-left corner (rows 0–2,
columns 0–6, where the backdoor trigger of spec §2.2 is written) is plain background noise for every class.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["CLASS_CODES", "class_prototypes", "make_synthetic", "synthetic_images"]

_CODE_SEED = 0x5EED
_SIZE = 28
_CELL = 8
_PITCH = 9
_MAX_SHIFT = 2
_NOISE_STD = 0.08


def _class_codes(num_codes: int = 10, bits: int = 8, min_distance: int = 3) -> tuple[tuple[int, ...], ...]:
    """Greedy choice, in a fixed shuffled order, of codes with 3-5 ones and pairwise Hamming distance ≥ 3."""
    pool = [c for c in range(2**bits) if 3 <= bin(c).count("1") <= 5]
    np.random.RandomState(_CODE_SEED).shuffle(pool)
    chosen: list[int] = []
    for code in pool:
        if all(bin(code ^ other).count("1") >= min_distance for other in chosen):
            chosen.append(code)
        if len(chosen) == num_codes:
            break
    return tuple(tuple((code >> k) & 1 for k in range(bits)) for code in chosen)


#: Lit cells of each class, for the grid cells 1…8 in row-major order (cell 0, top-left, is never lit).
CLASS_CODES: tuple[tuple[int, ...], ...] = _class_codes()


def class_prototypes(margin: int = _MAX_SHIFT) -> np.ndarray:
    """P_c as float64 [10, 28 + 2·margin, 28 + 2·margin]: 1 on the lit cells of class c, 0 elsewhere.

    The canvas has ``margin`` extra pixels on each side so that a shifted 28×28 window can be cut from it.
    """
    size = _SIZE + 2 * margin
    protos = np.zeros((len(CLASS_CODES), size, size))
    for c, code in enumerate(CLASS_CODES):
        for k, lit in enumerate((0, *code)):
            if lit:
                r, q = divmod(k, 3)
                top, left = margin + 1 + r * _PITCH, margin + 1 + q * _PITCH
                protos[c, top : top + _CELL, left : left + _CELL] = 1.0
    return protos


def synthetic_images(labels: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Draw one uint8 [N, 28, 28] image per label (formula in the module docstring), vectorised."""
    n = int(labels.shape[0])
    protos = class_prototypes()
    amp = rng.uniform(0.7, 1.0, size=(n, 1, 1))
    dy = rng.randint(0, 2 * _MAX_SHIFT + 1, size=n)
    dx = rng.randint(0, 2 * _MAX_SHIFT + 1, size=n)
    noise = rng.normal(0.0, _NOISE_STD, size=(n, _SIZE, _SIZE))
    rows = dy[:, None] + np.arange(_SIZE)  # [N, 28]
    cols = dx[:, None] + np.arange(_SIZE)
    windows = protos[labels[:, None, None], rows[:, :, None], cols[:, None, :]]  # [N, 28, 28]
    images: np.ndarray = np.rint(np.clip(amp * windows + noise, 0.0, 1.0) * 255.0).astype(np.uint8)
    return images


def make_synthetic(
    n_train: int = 2000, n_test: int = 500, seed: int = 0, num_classes: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic synthetic ``(train_x, train_y, test_x, test_y)``: uint8 [N, 1, 28, 28] images.

    Labels (int64) are i.i.d. uniform over ``num_classes``; everything is drawn from
    ``np.random.RandomState(seed)`` (training set first, then test set; a stream numpy keeps stable across
    versions), so equal arguments give identical tensors.
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"synthetic sizes must be >= 0, got ({n_train}, {n_test})")
    if not 1 <= num_classes <= len(CLASS_CODES):
        raise ValueError(f"num_classes must be in 1..{len(CLASS_CODES)}, got {num_classes}")
    rng = np.random.RandomState(seed)
    out: list[torch.Tensor] = []
    for n in (n_train, n_test):
        labels = rng.randint(0, num_classes, size=n)
        images = synthetic_images(labels, rng)
        out += [torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))]
    return out[0], out[1], out[2], out[3]
