"""Build ``src/spmc/data/fmnist_sample.npz``, the Fashion-MNIST sample embedded in the package.

Source: the official Fashion-MNIST IDX files (Xiao, Rasul, Vollgraf, "Fashion-MNIST: a Novel Image Dataset for
Benchmarking Machine Learning Algorithms", 2017; https://github.com/zalandoresearch/fashion-mnist), as
installed by Debian's ``dataset-fashion-mnist`` package in ``/usr/share/datasets/fashion-mnist``.
Fashion-MNIST is Copyright (c) 2017 Zalando SE and distributed under the MIT licence, which permits
redistributing this subset.

Sample: class-stratified, ``--train-per-class`` (600) training and ``--test-per-class`` (100) test images per
class, drawn without replacement by ``np.random.RandomState(--seed)`` (class 0 first, then 1, …), with the
chosen indices sorted so that the official file order is kept (the server split of spec §1.2 takes the tail of
the training set).

Arrays written (``np.savez_compressed``): ``train_images`` uint8 [6000, 28, 28], ``train_labels`` uint8
[6000], ``test_images`` uint8 [1000, 28, 28], ``test_labels`` uint8 [1000], and, for provenance,
``train_index`` and ``test_index`` (int32), the positions of the chosen images in the official files.

Usage: ``python scripts/build_embedded_sample.py [--source DIR] [--out FILE] [--seed N]``
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
try:
    from spmc.data.readers import load_idx_folder
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(ROOT / "src"))
    from spmc.data.readers import load_idx_folder

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = ROOT / "src" / "spmc" / "data" / "fmnist_sample.npz"
NUM_CLASSES = 10


def stratified_indices(labels: np.ndarray, per_class: int, rng: np.random.RandomState) -> np.ndarray:
    """``per_class`` positions per class, drawn without replacement (classes ascending), then sorted."""
    chosen = []
    for c in range(NUM_CLASSES):
        pool = np.flatnonzero(labels == c)
        if pool.size < per_class:
            raise SystemExit(f"class {c} has only {pool.size} images, fewer than {per_class}")
        chosen.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder with the 4 IDX files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .npz")
    parser.add_argument("--seed", type=int, default=0, help="numpy RandomState seed")
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args(argv)

    train_x, train_y, test_x, test_y = (t.numpy() for t in load_idx_folder(args.source))
    rng = np.random.RandomState(args.seed)
    train_index = stratified_indices(train_y, args.train_per_class, rng)
    test_index = stratified_indices(test_y, args.test_per_class, rng)

    arrays = {
        "train_images": train_x[train_index, 0],
        "train_labels": train_y[train_index].astype(np.uint8),
        "test_images": test_x[test_index, 0],
        "test_labels": test_y[test_index].astype(np.uint8),
        "train_index": train_index,
        "test_index": test_index,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)

    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, sha256 {digest[:16]}…)")
    for key, arr in arrays.items():
        print(f"  {key}: {arr.dtype} {list(arr.shape)}")
    print(f"  train per class: {np.bincount(arrays['train_labels'], minlength=NUM_CLASSES).tolist()}")
    print(f"  test per class:  {np.bincount(arrays['test_labels'], minlength=NUM_CLASSES).tolist()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
