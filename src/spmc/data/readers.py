"""Readers for the on-disk dataset formats, and the search for the folder that holds them (spec §1.2).

Nothing here downloads anything: a dataset that is not on disk raises :class:`DataError` with a message that
lists every folder searched and the exact files to put there.

Formats:

- **IDX** (MNIST, Fashion-MNIST): a 4-byte big-endian magic ``00 00 TT DD`` (TT = element type, DD = number of
  dimensions), DD big-endian uint32 sizes, then the payload in row-major order. Files may be gzipped.
- **CIFAR-10 "python version"**: pickled dicts ``data_batch_1`` … ``data_batch_5`` and ``test_batch`` holding
  ``b"data"`` (uint8 [10000, 3072], channel-major R, G, B planes of 32×32) and ``b"labels"`` (10000 ints).
  They are read with a restricted unpickler that only rebuilds numpy arrays and plain containers, so a
  tampered file cannot run code.
"""

from __future__ import annotations

import codecs
import gzip
import io
import logging
import math
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from spmc.data.errors import DataError
from spmc.data.registry import DATASETS, DatasetInfo

__all__ = [
    "CIFAR10_FILES",
    "DATA_DIR_ENV",
    "IDX_FILES",
    "load_cifar10_folder",
    "load_idx_folder",
    "load_split_folder",
    "read_idx",
    "resolve_data_dir",
]

logger = logging.getLogger(__name__)

#: Environment variable that names a folder holding the datasets (searched after an explicit ``data_dir``).
DATA_DIR_ENV = "SPMC_DATA_DIR"

#: The four IDX files of MNIST / Fashion-MNIST, in the order (train_x, train_y, test_x, test_y).
IDX_FILES: tuple[str, str, str, str] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

#: The CIFAR-10 python-version batches: five training batches, then the test batch.
CIFAR10_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)

_CIFAR_SUBDIR = "cifar-10-batches-py"

_GZIP_MAGIC = b"\x1f\x8b"

#: IDX element-type byte -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# ------------------------------------------------------------------------------------------------------------
# IDX
# ------------------------------------------------------------------------------------------------------------


def _read_maybe_gzipped(path: Path) -> bytes:
    """Return the bytes of ``path``, gunzipped when they start with the gzip magic ``1f 8b`` (any name)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc
    return raw


def _parse_idx(buf: bytes, source: str) -> np.ndarray:
    """Decode an IDX byte string; ``source`` names the file in error messages."""
    if len(buf) < 4:
        raise DataError(f"{source}: too short for an IDX header ({len(buf)} bytes)")
    zero0, zero1, type_code, ndim = buf[0], buf[1], buf[2], buf[3]
    magic = int.from_bytes(buf[:4], "big")
    if zero0 != 0 or zero1 != 0:
        raise DataError(
            f"{source}: bad IDX magic number 0x{magic:08x}; an IDX file starts with two zero bytes, "
            "a type byte and a dimension count (0x00000803 for uint8 images, 0x00000801 for uint8 labels)"
        )
    if type_code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DataError(f"{source}: unknown IDX element type 0x{type_code:02X} (magic 0x{magic:08x}); known: {known}")
    if ndim == 0:
        raise DataError(f"{source}: IDX header declares 0 dimensions (magic 0x{magic:08x})")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DataError(f"{source}: truncated IDX header: {ndim} dimensions need {header} bytes, file has {len(buf)}")
    dims = struct.unpack(f">{ndim}I", buf[4:header])
    dtype = _IDX_DTYPES[type_code]
    count = math.prod(dims)
    expected = count * dtype.itemsize
    payload = len(buf) - header
    if payload != expected:
        what = "truncated" if payload < expected else "has trailing bytes"
        raise DataError(
            f"{source}: IDX payload {what}: dimensions {tuple(dims)} of {dtype.newbyteorder('=').name} need "
            f"{expected} bytes, found {payload}"
        )
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # native byte order, writable copy


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (plain or gzipped) into a native-endian, writable numpy array.

    Layout: magic ``00 00 TT DD``, then DD big-endian uint32 sizes, then prod(sizes) elements of type TT
    (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64, all big-endian). Gzip is
    detected from the magic bytes ``1f 8b``, not from the file name. Used for MNIST and Fashion-MNIST
    (spec §1.2).

    Raises:
        DataError: the file cannot be read, is not valid gzip, has a bad magic number, or its payload length
            does not match the declared dimensions; the message names the file.
    """
    p = Path(path)
    return _parse_idx(_read_maybe_gzipped(p), str(p))


def _idx_candidates(stem: str) -> list[str]:
    """File names accepted for one IDX file: ``stem``, the dotted mirror variant, each plain or ``.gz``."""
    dotted = ".idx".join(stem.rsplit("-idx", 1))  # train-images-idx3-ubyte -> train-images.idx3-ubyte
    names = [stem, dotted] if dotted != stem else [stem]
    return [n + ext for n in names for ext in ("", ".gz")]


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    for name in _idx_candidates(stem):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def _missing_idx_files(folder: Path) -> list[str]:
    return [stem for stem in IDX_FILES if _find_idx_file(folder, stem) is None]


def _idx_images(arr: np.ndarray, path: Path) -> torch.Tensor:
    if arr.ndim != 3 or arr.dtype != np.uint8:
        raise DataError(f"{path}: expected uint8 images [N, H, W], got {arr.dtype} with shape {arr.shape}")
    return torch.from_numpy(arr).unsqueeze(1)


def _idx_labels(arr: np.ndarray, path: Path, n_images: int) -> torch.Tensor:
    if arr.ndim != 1 or arr.dtype != np.uint8:
        raise DataError(f"{path}: expected uint8 labels [N], got {arr.dtype} with shape {arr.shape}")
    if arr.shape[0] != n_images:
        raise DataError(f"{path}: {arr.shape[0]} labels for {n_images} images")
    return torch.from_numpy(arr.astype(np.int64))


def load_idx_folder(
    folder: str | os.PathLike[str],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load MNIST-style IDX files from ``folder`` as ``(train_x, train_y, test_x, test_y)`` (spec §1.2).

    Looks for ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte``, each plain or ``.gz``, also in the dotted form some mirrors use
    (``train-images.idx3-ubyte``). Images come back as uint8 ``[N, 1, H, W]`` (28×28 for (Fashion-)MNIST),
    labels as int64 ``[N]``, both in the official file order.

    Raises:
        DataError: a file is missing or malformed, or labels and images disagree in count.
    """
    root = Path(folder)
    found = {stem: _find_idx_file(root, stem) for stem in IDX_FILES}
    paths = [p for p in found.values() if p is not None]
    if len(paths) != len(IDX_FILES):
        missing = [stem for stem, p in found.items() if p is None]
        raise DataError(f"{root}: missing IDX file(s) {', '.join(missing)} (plain or .gz)")
    tr_x_path, tr_y_path, te_x_path, te_y_path = paths
    train_x = _idx_images(read_idx(tr_x_path), tr_x_path)
    train_y = _idx_labels(read_idx(tr_y_path), tr_y_path, train_x.shape[0])
    test_x = _idx_images(read_idx(te_x_path), te_x_path)
    test_y = _idx_labels(read_idx(te_y_path), te_y_path, test_x.shape[0])
    if train_x.shape[2:] != test_x.shape[2:]:
        raise DataError(
            f"{root}: training images are {tuple(train_x.shape[2:])} but test images are {tuple(test_x.shape[2:])}"
        )
    return train_x, train_y, test_x, test_y


# ------------------------------------------------------------------------------------------------------------
# CIFAR-10 python batches
# ------------------------------------------------------------------------------------------------------------


def _numpy_safe_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR batch may reference: numpy's array/scalar rebuilders and ``_codecs.encode``.

    The functions are taken from numpy's own ``__reduce__`` so the table is right for numpy 1.x
    (``numpy.core``) and 2.x (``numpy._core``) alike, without importing the deprecated module paths.
    """
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    scalar = np.uint8(0).__reduce__()[0]
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{core}.multiarray", "scalar")] = scalar
        table[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return table


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler resolving only the globals of :func:`_numpy_safe_globals` (no arbitrary code execution)."""

    _allowed = _numpy_safe_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays and plain containers are allowed"
            ) from None


def _load_pickle(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            data = f.read()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # any failure of a malformed pickle becomes a DataError naming the file
        raise DataError(f"{path}: not a readable CIFAR-10 python batch ({type(exc).__name__}: {exc})") from exc


def _get_key(batch: dict[Any, Any], key: str) -> Any:
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise KeyError(key)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (uint8 [n, 3, 32, 32], int64 [n])."""
    batch = _load_pickle(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    try:
        data = _get_key(batch, "data")
        labels = _get_key(batch, "labels")
    except KeyError as exc:
        raise DataError(f"{path}: CIFAR-10 batch has no {exc.args[0]!r} entry (keys: {list(batch)})") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be uint8 [n, 3072], got {desc}")
    try:
        labels_arr = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: 'labels' is not a list of integers ({exc})") from exc
    if labels_arr.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {labels_arr.shape[0]} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32), labels_arr


def _cifar_root(folder: Path) -> Path:
    """``folder`` itself if it holds the batches, else ``folder/cifar-10-batches-py`` if that does."""
    nested = folder / _CIFAR_SUBDIR
    if not (folder / CIFAR10_FILES[0]).is_file() and (nested / CIFAR10_FILES[0]).is_file():
        return nested
    return folder


def _missing_cifar_files(folder: Path) -> list[str]:
    root = _cifar_root(folder)
    return [name for name in CIFAR10_FILES if not (root / name).is_file()]


def load_cifar10_folder(
    folder: str | os.PathLike[str],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load the CIFAR-10 python batches as ``(train_x, train_y, test_x, test_y)`` (spec §1.2).

    ``folder`` holds ``data_batch_1`` … ``data_batch_5`` and ``test_batch`` directly or in
    ``cifar-10-batches-py/``. Each row of ``b"data"`` is 1024 red, 1024 green, 1024 blue values, so it
    reshapes to uint8 ``[3, 32, 32]``. Training images are the five batches concatenated in order (the
    official order, N = 50,000). Pickles are read with a restricted unpickler (numpy arrays and plain
    containers only).

    Raises:
        DataError: a batch is missing, not a safe pickle, or not shaped like a CIFAR-10 batch.
    """
    root = _cifar_root(Path(folder))
    missing = _missing_cifar_files(root)
    if missing:
        raise DataError(f"{root}: missing CIFAR-10 python batch file(s) {', '.join(missing)}")
    parts = [_read_cifar_batch(root / name) for name in CIFAR10_FILES[:-1]]
    test_x, test_y = _read_cifar_batch(root / CIFAR10_FILES[-1])
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    return (
        torch.from_numpy(np.ascontiguousarray(train_x)),
        torch.from_numpy(train_y),
        torch.from_numpy(np.ascontiguousarray(test_x)),
        torch.from_numpy(test_y),
    )


# ------------------------------------------------------------------------------------------------------------
# Folder resolution
# ------------------------------------------------------------------------------------------------------------


def _missing_files(info: DatasetInfo, folder: Path) -> list[str]:
    return _missing_cifar_files(folder) if info.source == "cifar10" else _missing_idx_files(folder)


def _candidates(info: DatasetInfo, data_dir: str | os.PathLike[str] | None) -> list[tuple[Path, str]]:
    """Every folder to try, in search order, each with a note saying where it came from."""
    out: list[tuple[Path, str]] = []
    roots: list[tuple[Path, str]] = []
    if data_dir is not None:
        roots.append((Path(data_dir).expanduser(), "data_dir / --data-dir"))
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        roots.append((Path(env).expanduser(), f"${DATA_DIR_ENV}"))
    for root, origin in roots:
        out.append((root, origin))
        out.extend((root / sub, origin) for sub in info.subdirs)
    out.extend((Path(p), "system folder") for p in info.system_dirs)
    return out


def _how_to_provide(info: DatasetInfo) -> str:
    if info.source == "cifar10":
        files = ", ".join(CIFAR10_FILES)
        what = (
            f'the CIFAR-10 python batches ({files}) from the "CIFAR-10 python version" archive '
            f"(cifar-10-python.tar.gz; its {_CIFAR_SUBDIR}/ folder may be used as is)"
        )
    else:
        what = f"the four IDX files {', '.join(IDX_FILES)} (each plain or .gz)"
    lines = [
        f"To provide it, put {what} in a folder and pass it with --data-dir FOLDER "
        f"(data_dir=FOLDER in Python), or set the environment variable {DATA_DIR_ENV}=FOLDER.",
    ]
    if info.install_hint:
        lines.append(info.install_hint)
    lines.append("spmc never downloads data. The embedded sample needs no files: use dataset 'fmnist-sample'.")
    return "\n".join(lines)


def resolve_data_dir(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Find the folder holding the files of dataset ``name`` (``"fmnist"``, ``"mnist"`` or ``"cifar10"``).

    Search order (spec §1.2; DESIGN "Errors are for people"): the explicit ``data_dir`` and its sub-folders
    (the dataset's ``DatasetInfo.subdirs``: ``fashion-mnist``/``fmnist``/``FashionMNIST/raw`` for fmnist, ...);
    then ``$SPMC_DATA_DIR`` and the same sub-folders; then its ``system_dirs`` (for fmnist, Debian's
    ``/usr/share/datasets/fashion-mnist``). The first folder holding every required file wins. Any dataset whose
    ``source`` is ``idx`` or ``cifar10`` (a plug-in's too) is found this way.

    Raises:
        ValueError: ``name`` is not a dataset read from files.
        DataError: no folder holds the files; the message lists each place searched, what was missing there,
            and how to provide the files.
    """
    info = DATASETS.get(name)
    if info is None or info.source not in ("idx", "cifar10"):
        files = sorted(k for k, v in DATASETS.items() if v.source in ("idx", "cifar10"))
        raise ValueError(f"dataset={name!r} is not read from files; file-backed datasets: {', '.join(files)}")
    report: list[str] = []
    for folder, origin in _candidates(info, data_dir):
        if not folder.is_dir():
            report.append(f"  - {folder} ({origin}): does not exist")
            continue
        missing = _missing_files(info, folder)
        if not missing:
            if data_dir is not None and origin != "data_dir / --data-dir":
                logger.warning("dataset %s not found under data_dir=%s; using %s (%s)", name, data_dir, folder, origin)
            logger.info("dataset %s: reading files from %s", name, folder)
            return folder
        report.append(f"  - {folder} ({origin}): missing {', '.join(missing)}")
    if data_dir is None:
        report.append("  - (no data_dir / --data-dir given)")
    if not os.environ.get(DATA_DIR_ENV):
        report.append(f"  - (${DATA_DIR_ENV} is not set)")
    raise DataError(f"dataset {name!r} was not found. Looked in:\n" + "\n".join(report) + "\n" + _how_to_provide(info))


# ------------------------------------------------------------------------------------------------------------
# One split of one folder (a Flower node's own data, a server's own test set)
# ------------------------------------------------------------------------------------------------------------

Split = Literal["train", "test"]


def _idx_split(root: Path, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    images_stem, labels_stem = IDX_FILES[:2] if split == "train" else IDX_FILES[2:]
    images_path, labels_path = _find_idx_file(root, images_stem), _find_idx_file(root, labels_stem)
    if images_path is None or labels_path is None:
        missing = [s for s, p in ((images_stem, images_path), (labels_stem, labels_path)) if p is None]
        raise DataError(f"{root}: missing IDX file(s) {', '.join(missing)} (plain or .gz) of the {split} split")
    images = _idx_images(read_idx(images_path), images_path)
    return images, _idx_labels(read_idx(labels_path), labels_path, images.shape[0])


def _cifar_split(root: Path, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    root = _cifar_root(root)
    names = CIFAR10_FILES[:-1] if split == "train" else CIFAR10_FILES[-1:]
    present = [name for name in names if (root / name).is_file()]
    if not present:
        raise DataError(f"{root}: no CIFAR-10 python batch of the {split} split ({', '.join(names)})")
    parts = [_read_cifar_batch(root / name) for name in present]
    images = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))
    return torch.from_numpy(images), torch.from_numpy(np.concatenate([p[1] for p in parts]))


def load_split_folder(name: str, folder: str | os.PathLike[str], split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``split`` images (uint8 ``[N, C, H, W]``) and labels (int64 ``[N]``) of dataset ``name`` stored in
    ``folder`` itself, in file order; no other folder is searched and the other split's files need not exist.

    Used where one party holds part of a dataset in its standard files: a Flower node's own training data
    (``data-dir`` of its node config) and the Flower server's own test set. IDX datasets read the split's two files
    (``train-images-idx3-ubyte`` + ``train-labels-idx1-ubyte``, or the ``t10k-`` pair; plain, ``.gz`` or dotted);
    CIFAR-10 reads the ``data_batch_*`` files present (train) or ``test_batch`` (test), also in
    ``cifar-10-batches-py/``. Labels must lie in 0..num_classes − 1.

    Raises:
        ValueError: ``name`` is not a dataset read from files (the message lists those that are).
        DataError: the folder does not exist, holds no file of the split or no image, or a file is malformed; the
            message names the folder or file.
    """
    info = DATASETS.get(name)
    if info is None or info.source not in ("idx", "cifar10"):
        files = sorted(k for k, v in DATASETS.items() if v.source in ("idx", "cifar10"))
        raise ValueError(f"dataset={name!r} is not read from files; file-backed datasets: {', '.join(files)}")
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: folder does not exist")
    images, labels = _cifar_split(root, split) if info.source == "cifar10" else _idx_split(root, split)
    if images.shape[0] == 0:
        raise DataError(f"{root}: the {split} files of {name} hold no image")
    if int(labels.min()) < 0 or int(labels.max()) >= info.num_classes:
        raise DataError(
            f"{root}: {split} labels span [{int(labels.min())}, {int(labels.max())}], "
            f"expected 0..{info.num_classes - 1}"
        )
    return images, labels
