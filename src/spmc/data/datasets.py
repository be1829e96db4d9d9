"""Loading a dataset by name into memory as uint8 tensors (spec §1.2; DESIGN "Data lives in memory")."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

from spmc.data.errors import DataError
from spmc.data.readers import load_cifar10_folder, load_idx_folder, resolve_data_dir
from spmc.data.registry import DATASETS
from spmc.data.synthetic import make_synthetic

__all__ = ["EMBEDDED_SAMPLE", "EMBEDDED_SAMPLE_LICENSE", "RawDataset", "load_dataset", "load_embedded_sample"]

logger = logging.getLogger(__name__)

#: File name of the embedded Fashion-MNIST sample inside the ``spmc.data`` package.
EMBEDDED_SAMPLE = "fmnist_sample.npz"

#: Licence of the embedded sample (a subset of Fashion-MNIST, https://github.com/zalandoresearch/fashion-mnist).
EMBEDDED_SAMPLE_LICENSE = """\
Fashion-MNIST: Copyright (c) 2017 Zalando SE. The MIT License (MIT).

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial
portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES
OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN
CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


@dataclass(frozen=True, eq=False)  # tensors have no boolean ==; compare fields with torch.equal
class RawDataset:
    """A dataset as loaded from its source, before any transform.

    Images are uint8 ``[N, C, H, W]`` with C = 1 (MNIST-like) or 3 (CIFAR-10), labels int64 ``[N]``, both in
    the official file order (the server split of spec §1.2 relies on that order).
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images: torch.Tensor = getattr(self, f"{split}_images")
            labels: torch.Tensor = getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
                raise DataError(
                    f"{self.name}: {split}_images must be uint8 [N, 1 or 3, H, W], got {images.dtype} "
                    f"{tuple(images.shape)}"
                )
            if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
                raise DataError(
                    f"{self.name}: {split}_labels must be int64 [{images.shape[0]}], got {labels.dtype} "
                    f"{tuple(labels.shape)}"
                )

    @property
    def channels(self) -> int:
        """Number of stored channels (1 or 3); the transforms always produce 3."""
        return int(self.train_images.shape[1])


def load_embedded_sample() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read the Fashion-MNIST sample shipped in the package (``spmc/data/fmnist_sample.npz``).

    6,000 training images (600 per class) and 1,000 test images (100 per class), drawn class-stratified from
    the official files by ``scripts/build_embedded_sample.py`` and kept in official order. Returns uint8
    [N, 1, 28, 28] images and int64 labels. Fashion-MNIST is MIT-licensed (Zalando SE); the notice is
    ``EMBEDDED_SAMPLE_LICENSE``.
    """
    ref = resources.files("spmc.data").joinpath(EMBEDDED_SAMPLE)
    try:
        with resources.as_file(ref) as path, np.load(path) as npz:
            arrays = {k: npz[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(
            f"the embedded sample spmc/data/{EMBEDDED_SAMPLE} is missing or damaged ({exc}); "
            "rebuild it with scripts/build_embedded_sample.py"
        ) from exc
    return (
        torch.from_numpy(arrays["train_images"]).unsqueeze(1),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        torch.from_numpy(arrays["test_images"]).unsqueeze(1),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
    )


def _check_labels(ds: RawDataset, num_classes: int) -> None:
    for split, labels in (("train", ds.train_labels), ("test", ds.test_labels)):
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise DataError(
                f"{ds.name}: {split} labels span [{int(labels.min())}, {int(labels.max())}], "
                f"expected 0..{num_classes - 1}"
            )


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    synthetic_size: tuple[int, int] = (2000, 500),
    seed: int = 0,
) -> RawDataset:
    """Load dataset ``name`` (a key of ``DATASETS``) into memory (spec §1.2).

    - ``"fmnist"``, ``"mnist"``: IDX files, ``"cifar10"``: python pickle batches, found by
      :func:`~spmc.data.readers.resolve_data_dir` from ``data_dir``, ``$SPMC_DATA_DIR`` or system folders;
    - ``"fmnist-sample"``: the sample embedded in the package (``data_dir`` is ignored);
    - ``"synthetic"``: :func:`~spmc.data.synthetic.make_synthetic` with ``synthetic_size = (n_train, n_test)``
      and ``seed`` (both ignored by the other datasets).

    Raises:
        ValueError: unknown ``name`` (the message names the field ``dataset``, the value and the allowed
            names).
        DataError: the files are missing or malformed (the message says where it looked and what to
            provide), or the test set is empty.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is not a known dataset; allowed: {', '.join(sorted(DATASETS))}")
    start = time.perf_counter()
    info = DATASETS[name]
    if info.source == "embedded":
        arrays = load_embedded_sample()
    elif info.source == "synthetic":
        n_train, n_test = synthetic_size
        arrays = make_synthetic(n_train, n_test, seed=seed, num_classes=info.num_classes)
    elif info.source == "cifar10":
        arrays = load_cifar10_folder(resolve_data_dir(name, data_dir))
    else:
        arrays = load_idx_folder(resolve_data_dir(name, data_dir))
    ds = RawDataset(name, *arrays)
    _check_labels(ds, DATASETS[name].num_classes)
    if ds.test_images.shape[0] == 0:
        where = f" in {data_dir}" if data_dir is not None and info.source in ("idx", "cifar10") else ""
        raise DataError(f"{name}: the test set{where} has no images; accuracy and ASR cannot be measured without one")
    logger.info(
        "loaded %s: %d train + %d test images of shape %s in %.2f s",
        name,
        ds.train_images.shape[0],
        ds.test_images.shape[0],
        tuple(ds.train_images.shape[1:]),
        time.perf_counter() - start,
    )
    return ds
