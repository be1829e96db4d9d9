"""Tests of spmc.data (spec §1.2): readers, folder search, sample, synthetic set, transforms, partition."""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spmc.data import (
    DATA_DIR_ENV,
    DATASETS,
    IDX_FILES,
    DataError,
    Preprocessor,
    dirichlet_partition,
    load_cifar10_folder,
    load_dataset,
    load_idx_folder,
    make_synthetic,
    normalize,
    random_crop,
    random_hflip,
    read_idx,
    resolve_data_dir,
    server_split,
    to_three_channels,
    to_unit_float,
)
from spmc.data import readers as readers_mod

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
HAVE_DEBIAN_FMNIST = all((DEBIAN_FMNIST / f"{name}.gz").is_file() for name in IDX_FILES)

_IDX_CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


# ------------------------------------------------------------------------------------------------------------
# helpers that write tiny dataset files
# ------------------------------------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray) -> bytes:
    code = _IDX_CODES[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def tiny_mnist(seed: int = 0, n_train: int = 12, n_test: int = 6) -> tuple[np.ndarray, ...]:
    rng = np.random.RandomState(seed)
    return (
        rng.randint(0, 256, size=(n_train, 28, 28)).astype(np.uint8),
        (np.arange(n_train) % 10).astype(np.uint8),
        rng.randint(0, 256, size=(n_test, 28, 28)).astype(np.uint8),
        (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    )


def write_mnist_folder(folder: Path, gz: bool = True, dotted: bool = False, seed: int = 0) -> tuple[np.ndarray, ...]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = tiny_mnist(seed)
    for stem, arr in zip(IDX_FILES, arrays, strict=True):
        name = ".idx".join(stem.rsplit("-idx", 1)) if dotted else stem
        write_idx(folder / (name + (".gz" if gz else "")), arr, gz)
    return arrays


def write_cifar_folder(folder: Path, per_batch: int = 20, protocol: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Write data_batch_1..5 + test_batch; return (images [6·per_batch, 3072], labels) in file order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(1)
    images = rng.randint(0, 256, size=(6 * per_batch, 3072)).astype(np.uint8)
    labels = rng.randint(0, 10, size=6 * per_batch)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        sl = slice(k * per_batch, (k + 1) * per_batch)
        batch = {b"batch_label": name.encode(), b"data": images[sl], b"labels": labels[sl].tolist()}
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    return images, labels


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No $SPMC_DATA_DIR and no system folders, so only what a test writes can be found."""
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    fmnist = dataclasses.replace(DATASETS["fmnist"], system_dirs=("/nonexistent/spmc-test/fashion-mnist",))
    monkeypatch.setitem(DATASETS, "fmnist", fmnist)


# ------------------------------------------------------------------------------------------------------------
# IDX reader
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "arr",
    [
        np.arange(7 * 5 * 4, dtype=np.uint8).reshape(7, 5, 4),  # images
        np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.uint8),  # labels
        np.array([[-3, 7], [127, -128]], dtype=np.int8),
        np.array([-300, 2, 30000], dtype=np.int16),
        np.array([[1, -2, 2**30]], dtype=np.int32),
        np.array([0.5, -1.25, 3e10], dtype=np.float32),
        np.array([[np.pi, -np.e]], dtype=np.float64),
    ],
    ids=["images", "labels", "int8", "int16", "int32", "float32", "float64"],
)
def test_read_idx_roundtrip(tmp_path: Path, arr: np.ndarray, gz: bool) -> None:
    path = write_idx(tmp_path / ("x.gz" if gz else "x"), arr, gz)
    out = read_idx(path)
    assert out.dtype == arr.dtype and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)
    out.flat[0] = out.flat[0]  # writable


def test_read_idx_detects_gzip_by_magic_not_name(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    path = tmp_path / "train-images-idx3-ubyte"  # gzipped content, no .gz suffix
    path.write_bytes(gzip.compress(idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx(path), arr)


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda b: b"\x12\x34" + b[2:], "magic"),
        (lambda b: b[:2] + b"\x07" + b[3:], "element type"),
        (lambda b: b[:-5], "truncated"),
        (lambda b: b + b"\x00\x00", "trailing"),
        (lambda b: b[:10], "truncated"),
        (lambda b: b[:2], "too short"),
    ],
    ids=["bad-magic", "bad-type", "short-payload", "trailing", "short-header", "tiny"],
)
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_malformed_raises_dataerror_naming_file(tmp_path: Path, mutate, needle: str, gz: bool) -> None:
    data = mutate(idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4)))
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match=needle) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_read_idx_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 4), np.uint8)))[:-6])
    with pytest.raises(DataError, match="gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "nope")


@pytest.mark.parametrize("gz, dotted", [(True, False), (False, False), (True, True), (False, True)])
def test_load_idx_folder(tmp_path: Path, gz: bool, dotted: bool) -> None:
    arrays = write_mnist_folder(tmp_path, gz=gz, dotted=dotted)
    train_x, train_y, test_x, test_y = load_idx_folder(tmp_path)
    assert train_x.dtype == torch.uint8 and train_x.shape == (12, 1, 28, 28)
    assert test_x.shape == (6, 1, 28, 28)
    assert train_y.dtype == torch.int64 and test_y.dtype == torch.int64
    np.testing.assert_array_equal(train_x[:, 0].numpy(), arrays[0])
    np.testing.assert_array_equal(train_y.numpy(), arrays[1])
    np.testing.assert_array_equal(test_x[:, 0].numpy(), arrays[2])
    np.testing.assert_array_equal(test_y.numpy(), arrays[3])


def test_load_idx_folder_label_count_mismatch(tmp_path: Path) -> None:
    write_mnist_folder(tmp_path, gz=False)
    write_idx(tmp_path / IDX_FILES[1], np.zeros(5, np.uint8), gz=False)
    with pytest.raises(DataError, match="5 labels for 12 images"):
        load_idx_folder(tmp_path)


def test_load_dataset_mnist_from_folder(tmp_path: Path, no_env: None) -> None:
    arrays = write_mnist_folder(tmp_path)
    ds = load_dataset("mnist", tmp_path)
    assert ds.name == "mnist"
    assert ds.train_images.shape == (12, 1, 28, 28) and ds.test_images.shape == (6, 1, 28, 28)
    np.testing.assert_array_equal(ds.train_labels.numpy(), arrays[1])


@pytest.mark.parametrize("sub", ["mnist", "MNIST/raw"])
def test_load_dataset_mnist_subfolder(tmp_path: Path, no_env: None, sub: str) -> None:
    write_mnist_folder(tmp_path / sub)
    assert resolve_data_dir("mnist", tmp_path) == tmp_path / sub
    assert load_dataset("mnist", tmp_path).train_images.shape[0] == 12


def test_env_var_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DATASETS, "fmnist", dataclasses.replace(DATASETS["fmnist"], system_dirs=()))
    write_mnist_folder(tmp_path / "fashion-mnist", seed=3)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir("fmnist") == tmp_path / "fashion-mnist"
    ds = load_dataset("fmnist")
    np.testing.assert_array_equal(ds.train_images[:, 0].numpy(), tiny_mnist(3)[0])


def test_explicit_data_dir_wins_over_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mnist_folder(tmp_path / "a", seed=1)
    write_mnist_folder(tmp_path / "b", seed=2)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "b"))
    assert resolve_data_dir("mnist", tmp_path / "a") == tmp_path / "a"
    assert resolve_data_dir("mnist") == tmp_path / "b"


@pytest.mark.parametrize("name", ["mnist", "fmnist"])
def test_missing_idx_dataset_message(tmp_path: Path, no_env: None, name: str) -> None:
    where = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_dataset(name, where)
    msg = str(info.value)
    assert str(where) in msg
    for file_name in IDX_FILES:
        assert file_name in msg
    assert "--data-dir" in msg and DATA_DIR_ENV in msg
    if name == "fmnist":
        assert "apt-get install dataset-fashion-mnist" in msg
        assert "/nonexistent/spmc-test/fashion-mnist" in msg
        assert str(where / "fashion-mnist") in msg
    else:
        assert "apt-get" not in msg
        assert str(where / "MNIST" / "raw") in msg


def test_partial_folder_lists_missing_files(tmp_path: Path, no_env: None) -> None:
    write_mnist_folder(tmp_path)
    (tmp_path / (IDX_FILES[2] + ".gz")).unlink()
    with pytest.raises(DataError, match=f"missing {IDX_FILES[2]}"):
        load_dataset("mnist", tmp_path)


def test_missing_cifar_message(tmp_path: Path, no_env: None) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg
    assert "data_batch_1" in msg and "data_batch_5" in msg and "test_batch" in msg
    assert "CIFAR-10 python version" in msg and "--data-dir" in msg and DATA_DIR_ENV in msg


def test_unknown_dataset_name() -> None:
    with pytest.raises(ValueError, match="dataset") as info:
        load_dataset("imagenet")
    msg = str(info.value)
    assert "'imagenet'" in msg
    for name in DATASETS:
        assert name in msg


# ------------------------------------------------------------------------------------------------------------
# CIFAR-10 reader
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("nested", [False, True])
def test_load_cifar10_folder(tmp_path: Path, protocol: int, nested: bool) -> None:
    images, labels = write_cifar_folder(tmp_path / "cifar-10-batches-py" if nested else tmp_path, protocol=protocol)
    train_x, train_y, test_x, test_y = load_cifar10_folder(tmp_path)
    assert train_x.shape == (100, 3, 32, 32) and train_x.dtype == torch.uint8
    assert test_x.shape == (20, 3, 32, 32)
    assert train_y.dtype == torch.int64
    np.testing.assert_array_equal(train_x.reshape(100, -1).numpy(), images[:100])
    np.testing.assert_array_equal(test_x.reshape(20, -1).numpy(), images[100:])
    np.testing.assert_array_equal(train_y.numpy(), labels[:100])
    np.testing.assert_array_equal(test_y.numpy(), labels[100:])
    # channel-major layout: the first 1024 values are the red plane
    np.testing.assert_array_equal(train_x[0, 0].reshape(-1).numpy(), images[0, :1024])


def test_load_dataset_cifar10(tmp_path: Path, no_env: None) -> None:
    write_cifar_folder(tmp_path / "cifar10")
    ds = load_dataset("cifar10", tmp_path)
    assert ds.train_images.shape == (100, 3, 32, 32) and ds.channels == 3


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_unpickler_refuses_code(tmp_path: Path) -> None:
    write_cifar_folder(tmp_path)
    with (tmp_path / "data_batch_3").open("wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f)
    with pytest.raises(DataError, match="refusing") as info:
        load_cifar10_folder(tmp_path)
    assert "data_batch_3" in str(info.value)


def test_cifar_bad_batch_shape(tmp_path: Path) -> None:
    write_cifar_folder(tmp_path)
    with (tmp_path / "test_batch").open("wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(DataError, match="test_batch"):
        load_cifar10_folder(tmp_path)


def test_cifar_py2_style_pickle(tmp_path: Path) -> None:
    """A batch with bytes keys whose array refers to numpy.core (numpy 1.x paths) still loads."""
    write_cifar_folder(tmp_path)
    data = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}, protocol=2)
    data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    obj = readers_mod._RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    assert obj[b"labels"] == [1, 2] and obj[b"data"].shape == (2, 3072)


# ------------------------------------------------------------------------------------------------------------
# embedded sample, Debian files, synthetic set, registry
# ------------------------------------------------------------------------------------------------------------


def test_embedded_sample() -> None:
    ds = load_dataset("fmnist-sample")
    assert ds.train_images.shape == (6000, 1, 28, 28) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (1000, 1, 28, 28)
    assert torch.bincount(ds.train_labels, minlength=10).tolist() == [600] * 10
    assert torch.bincount(ds.test_labels, minlength=10).tolist() == [100] * 10


def test_embedded_sample_provenance() -> None:
    from importlib import resources

    with (
        resources.as_file(resources.files("spmc.data").joinpath("fmnist_sample.npz")) as path,
        np.load(path) as z,
    ):
        for split, n in (("train", 6000), ("test", 1000)):
            idx = z[f"{split}_index"]
            assert idx.dtype == np.int32 and idx.shape == (n,)
            assert np.all(np.diff(idx) > 0)  # sorted, unique: official order kept


@pytest.mark.skipif(not HAVE_DEBIAN_FMNIST, reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fmnist_and_sample_consistency(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    full = load_dataset("fmnist")
    assert full.train_images.shape == (60000, 1, 28, 28) and full.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(full.train_labels).tolist() == [6000] * 10
    sample = load_dataset("fmnist-sample")
    from importlib import resources

    with (
        resources.as_file(resources.files("spmc.data").joinpath("fmnist_sample.npz")) as path,
        np.load(path) as z,
    ):
        tr, te = (
            torch.from_numpy(z["train_index"].astype(np.int64)),
            torch.from_numpy(z["test_index"].astype(np.int64)),
        )
    assert torch.equal(sample.train_images, full.train_images[tr])
    assert torch.equal(sample.train_labels, full.train_labels[tr])
    assert torch.equal(sample.test_images, full.test_images[te])
    assert torch.equal(sample.test_labels, full.test_labels[te])


def test_synthetic_deterministic_by_seed() -> None:
    a = load_dataset("synthetic", synthetic_size=(300, 50), seed=5)
    b = load_dataset("synthetic", synthetic_size=(300, 50), seed=5)
    c = load_dataset("synthetic", synthetic_size=(300, 50), seed=6)
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.train_images, c.train_images)
    assert a.train_images.shape == (300, 1, 28, 28) and a.train_images.dtype == torch.uint8
    assert a.test_labels.shape == (50,) and a.train_labels.dtype == torch.int64
    assert set(a.train_labels.tolist()) == set(range(10))


def test_synthetic_classes_differ_and_corner_is_uninformative() -> None:
    x, y, _, _ = make_synthetic(2000, 0, seed=0)
    xf = x[:, 0].float()
    means = torch.stack([xf[y == c].mean(0) for c in range(10)])  # [10, 28, 28]
    gaps = torch.cdist(means.flatten(1), means.flatten(1))
    assert gaps[~torch.eye(10, dtype=torch.bool)].min() > 500  # prototypes far apart
    corner = means[:, 0:3, 0:7]
    assert float(corner.max() - corner.min()) < 15  # background noise only, for every class


def test_registry() -> None:
    assert set(DATASETS) == {"fmnist", "mnist", "cifar10", "fmnist-sample", "synthetic"}
    for key, info in DATASETS.items():
        assert info.name == key and info.num_classes == 10 and info.description
        assert info.hflip == (key == "cifar10")
        assert info.model == ("resnet10" if key == "cifar10" else "simplecnn")
        if key == "cifar10":
            assert info.mean == (0.4914, 0.4822, 0.4465) and info.std == (0.2470, 0.2435, 0.2615)
        else:
            assert info.mean == (0.1307,) * 3 and info.std == (0.3081,) * 3
    with pytest.raises(AttributeError):
        DATASETS["mnist"].name = "x"  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------------------
# transforms
# ------------------------------------------------------------------------------------------------------------


def test_to_unit_float_shape_and_range() -> None:
    x = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8)
    out = to_unit_float(x)
    assert out.shape == (10, 1, 32, 32) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(to_unit_float(x, chunk_size=3), out)
    const = torch.full((2, 1, 28, 28), 51, dtype=torch.uint8)
    torch.testing.assert_close(to_unit_float(const), torch.full((2, 1, 32, 32), 0.2))
    rgb = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(to_unit_float(rgb), rgb.float() / 255)
    with pytest.raises(ValueError):
        to_unit_float(x.float())


def test_to_three_channels() -> None:
    x = torch.rand(2, 1, 4, 4)
    y = to_three_channels(x)
    assert y.shape == (2, 3, 4, 4) and all(torch.equal(y[:, c], x[:, 0]) for c in range(3))
    y[:, 0] = 5.0  # a real copy: writing channel 0 leaves the others alone
    assert torch.equal(y[:, 1], x[:, 0])
    z = torch.rand(2, 3, 4, 4)
    assert to_three_channels(z) is z


def test_normalize_hand_computed() -> None:
    x = torch.tensor([[[[0.0, 1.0]], [[0.5, 0.25]], [[1.0, 0.0]]]])  # [1, 3, 1, 2]
    out = normalize(x, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    expected = torch.tensor([[[[-1.0, 1.0]], [[1.0, 0.0]], [[0.5, 0.0]]]])
    torch.testing.assert_close(out, expected)


def test_random_crop_padding_zero_is_identity() -> None:
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(random_crop(x, 0, torch.Generator().manual_seed(0)), x)


def test_random_crop_windows_of_padded_input() -> None:
    pad, b = 2, 16
    x = torch.rand(b, 3, 6, 5) + 1.0  # strictly positive, so zero padding is recognisable
    out = random_crop(x, pad, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    # every sample is one (2p+1)^2 window of its own padded image ...
    offsets = []
    for i in range(b):
        hits = [
            (oy, ox)
            for oy in range(2 * pad + 1)
            for ox in range(2 * pad + 1)
            if torch.equal(out[i], padded[i, :, oy : oy + 6, ox : ox + 5])
        ]
        assert len(hits) == 1
        offsets.append(hits[0])
    assert len(set(offsets)) > 1  # offsets are drawn per sample
    # ... namely the one given by the documented draws: all row offsets, then all column offsets
    g = torch.Generator().manual_seed(0)
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    assert offsets == list(zip(oy.tolist(), ox.tolist(), strict=True))
    i = 3
    torch.testing.assert_close(out[i], padded[i, :, oy[i] : oy[i] + 6, ox[i] : ox[i] + 5], rtol=0, atol=0)


def test_random_crop_deterministic_for_generator() -> None:
    x = torch.rand(32, 1, 32, 32)
    a = random_crop(x, 4, torch.Generator().manual_seed(7))
    b = random_crop(x, 4, torch.Generator().manual_seed(7))
    c = random_crop(x, 4, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_hflip() -> None:
    x = torch.rand(8, 3, 4, 5)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_hflip(x, 1.0, g), x.flip(-1))
    assert torch.equal(random_hflip(x, 0.0, g), x)
    mixed = random_hflip(torch.rand(200, 1, 2, 2), 0.5, g)
    assert mixed.shape == (200, 1, 2, 2)


def test_random_hflip_flips_about_half() -> None:
    x = torch.arange(2.0).view(1, 1, 1, 2).repeat(1000, 1, 1, 1)
    out = random_hflip(x, 0.5, torch.Generator().manual_seed(1))
    flipped = (out[:, 0, 0, 0] == 1.0).float().mean().item()
    assert 0.4 < flipped < 0.6


@pytest.mark.parametrize("name", ["fmnist-sample", "cifar10"])
def test_preprocessor(name: str) -> None:
    info = DATASETS[name]
    channels = 3 if name == "cifar10" else 1
    x01 = to_unit_float(torch.randint(0, 256, (5, channels, 28, 28), dtype=torch.uint8))
    pre = Preprocessor(info)
    test_out = pre.test(x01)
    assert test_out.shape == (5, 3, 32, 32) and test_out.dtype == torch.float32 and test_out.is_contiguous()
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    torch.testing.assert_close(test_out, (x01.expand(-1, 3, -1, -1) - mean) / std)
    # grey images are normalised before the copy to 3 channels: the same values, bit for bit
    assert torch.equal(test_out, normalize(to_three_channels(x01), info.mean, info.std))
    train_out = pre.train(x01, torch.Generator().manual_seed(0))
    assert train_out.shape == (5, 3, 32, 32) and train_out.dtype == torch.float32 and train_out.is_contiguous()
    assert torch.equal(pre.train(x01, torch.Generator().manual_seed(0)), train_out)
    view = pre.train(x01, torch.Generator().manual_seed(0), grey_view=True)
    assert torch.equal(view, train_out)  # the same values; grey images as a stride-0 view of one channel
    assert (view.stride(1) == 0) == (channels == 1)
    # the zero padding happens in [0, 1] space: on an all-ones batch, padded pixels normalise to -mean/std
    ones = pre.train(torch.ones(64, channels, 32, 32), torch.Generator().manual_seed(0))
    pad_value, img_value = -mean / std, (1 - mean) / std
    is_pad = torch.isclose(ones, pad_value.expand_as(ones))
    assert torch.all(is_pad | torch.isclose(ones, img_value.expand_as(ones)))
    assert is_pad.any() and not is_pad.all()


def test_preprocessor_flip_only_for_cifar() -> None:
    x01 = torch.rand(64, 3, 32, 32)
    cifar = Preprocessor(DATASETS["cifar10"], padding=0)
    mnist = Preprocessor(DATASETS["mnist"], padding=0)
    cifar_train = cifar.train(x01, torch.Generator().manual_seed(0))
    mnist_train = mnist.train(x01, torch.Generator().manual_seed(0))
    assert torch.equal(mnist_train, mnist.test(x01))  # no flip for MNIST-like data
    test = cifar.test(x01)
    flipped = [torch.equal(cifar_train[i], test[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(cifar_train[i], test[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)


@pytest.mark.parametrize("n, n_tr", [(60000, 54000), (50000, 45000), (6000, 5400), (10, 9), (0, 0)])
def test_server_split(n: int, n_tr: int) -> None:
    pool, val = server_split(n, 0.1)
    assert len(pool) == n_tr and len(val) == n - n_tr
    np.testing.assert_array_equal(np.concatenate([pool, val]), np.arange(n))
    assert pool.dtype == np.int64


# ------------------------------------------------------------------------------------------------------------
# Dirichlet partition
# ------------------------------------------------------------------------------------------------------------


def reference_partition(labels: np.ndarray, k: int, beta: float, min_size: int, seed: int) -> list[list[int]]:
    """The reference code's loop (NIID-Bench style), with the global RNG replaced by RandomState(seed)."""
    rs = np.random.RandomState(seed)
    n = labels.shape[0]
    size = 0
    while size < min_size:
        idx_batch: list[list[int]] = [[] for _ in range(k)]
        for c in range(10):
            idx_k = np.where(labels == c)[0]
            rs.shuffle(idx_k)
            proportions = rs.dirichlet(np.repeat(beta, k))
            proportions = np.array([p * (len(idx_j) < n / k) for p, idx_j in zip(proportions, idx_batch, strict=True)])
            proportions = proportions / proportions.sum()
            proportions = (np.cumsum(proportions) * len(idx_k)).astype(int)[:-1]
            idx_batch = [
                idx_j + idx.tolist() for idx_j, idx in zip(idx_batch, np.split(idx_k, proportions), strict=True)
            ]
            size = min(len(idx_j) for idx_j in idx_batch)
    for j in range(k):
        rs.shuffle(idx_batch[j])
    return idx_batch


def _labels(n: int = 5400, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 10, size=n)


def _assert_cap(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Cap of spec §1.2: a client already holding >= N/K samples gets nothing from later classes.

    Exception, from the floor of the cuts, for the last client: when its q is 0, cumsum(q)[K-2] may round to
    just below 1, and floor(cumsum·len) then leaves it one sample (the reference code does the same).
    Returns the [K, C] mask of capped (client, class) pairs.
    """
    n, k = labels.shape[0], len(parts)
    counts = np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])  # [K, C]
    capped = (np.cumsum(counts, axis=1) - counts) >= n / k
    assert np.all(counts[:-1][capped[:-1]] == 0)
    assert np.all(counts[-1][capped[-1]] <= 1)
    return capped


def _check_partition(parts: list[np.ndarray], labels: np.ndarray, k: int, min_size: int) -> None:
    assert len(parts) == k
    allidx = np.concatenate(parts)
    assert allidx.dtype == np.int64
    np.testing.assert_array_equal(np.sort(allidx), np.arange(labels.shape[0]))  # each index exactly once
    assert min(len(p) for p in parts) >= min_size
    _assert_cap(parts, labels, int(labels.max()) + 1)


def test_partition_matches_reference_code() -> None:
    labels = _labels()
    for seed in (0, 1, 2):
        ours = dirichlet_partition(labels, 10, 0.5, min_size=10, seed=seed)
        ref = reference_partition(labels, 10, 0.5, 10, seed)
        assert [p.tolist() for p in ours] == ref


def test_partition_properties_and_reproducibility() -> None:
    labels = _labels()
    a = dirichlet_partition(labels, 10, 0.5, seed=0)
    b = dirichlet_partition(labels, 10, 0.5, seed=0)
    c = dirichlet_partition(labels, 10, 0.5, seed=1)
    _check_partition(a, labels, 10, 10)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(len(x) != len(y) or not np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_partition_cap_is_active() -> None:
    """With small β some client hits the N/K cap; it then receives nothing from later classes."""
    labels = _labels(2000)
    parts = dirichlet_partition(labels, 5, 0.1, min_size=1, seed=0)
    assert _assert_cap(parts, labels, 10).any()


def test_partition_does_not_touch_global_rng() -> None:
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    dirichlet_partition(_labels(), 10, 0.5, seed=0)
    assert np.random.rand() == expected


def test_partition_beta_zero_equal_split() -> None:
    labels = np.repeat(np.arange(10), 50)
    parts = dirichlet_partition(labels, 5, 0.0, seed=0)
    for p in parts:
        assert np.bincount(labels[p], minlength=10).tolist() == [10] * 10


def test_partition_invalid_inputs() -> None:
    labels = _labels(100)
    with pytest.raises(ValueError, match="beta"):
        dirichlet_partition(labels, 10, -0.5)
    with pytest.raises(ValueError, match="num_clients"):
        dirichlet_partition(labels, 0, 0.5)
    with pytest.raises(ValueError, match="labels"):
        dirichlet_partition(labels, 2, 0.5, num_classes=5)
    with pytest.raises(ValueError, match="min_size=20.*100"):
        dirichlet_partition(labels, 10, 0.5, min_size=20)


def test_partition_unreachable_min_size() -> None:
    # 300 samples, 30 clients, at least 10 each: only a perfectly even split would do
    labels = np.repeat(np.arange(10), 30)
    with pytest.raises(ValueError, match=r"num_clients=30.*min_size=10.*300"):
        dirichlet_partition(labels, 30, 0.05, min_size=10, seed=0)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=400),
    num_classes=st.integers(min_value=1, max_value=10),
    k=st.integers(min_value=1, max_value=12),
    beta=st.sampled_from([0.0, 0.05, 0.3, 0.5, 1.0, 10.0]),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_partition_property(n: int, num_classes: int, k: int, beta: float, seed: int) -> None:
    labels = np.random.RandomState(seed % 1000).randint(0, num_classes, size=n)
    min_size = min(2, n // k)
    try:
        parts = dirichlet_partition(labels, k, beta, min_size=min_size, seed=seed, num_classes=num_classes)
    except ValueError as exc:  # only an unreachable minimum size may fail
        assert "min_size" in str(exc)
        return
    assert len(parts) == k
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))
    assert min(len(p) for p in parts) >= min_size
    if beta > 0:
        _assert_cap(parts, labels, num_classes)
    again = dirichlet_partition(labels, k, beta, min_size=min_size, seed=seed, num_classes=num_classes)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again, strict=True))


def test_a_registered_idx_dataset_is_read_by_its_info_not_its_name(
    tmp_path: Path, no_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the files are and how they are read come from ``DatasetInfo`` (source, subdirs), so a new dataset (a
    plug-in's) needs no code in the readers."""
    info = dataclasses.replace(DATASETS["mnist"], name="kmnist", subdirs=("kmnist-raw",), install_hint="ask Kuzushiji")
    monkeypatch.setitem(DATASETS, "kmnist", info)
    with pytest.raises(DataError, match="ask Kuzushiji"):
        load_dataset("kmnist", tmp_path)
    write_mnist_folder(tmp_path / "kmnist-raw")
    assert resolve_data_dir("kmnist", tmp_path) == tmp_path / "kmnist-raw"
    assert load_dataset("kmnist", tmp_path).train_images.shape[0] == 12
    with pytest.raises(ValueError, match="not read from files"):
        resolve_data_dir("synthetic")


def test_load_split_folder_reads_one_split_of_one_folder(tmp_path: Path) -> None:
    """A party's own files (a Flower node's training files, a server's test files): only that split is needed."""
    from spmc.data import load_split_folder

    tr_x, tr_y, te_x, te_y = write_mnist_folder(tmp_path / "both", dotted=True)
    x, y = load_split_folder("mnist", tmp_path / "both", "train")
    assert np.array_equal(x[:, 0].numpy(), tr_x) and np.array_equal(y.numpy(), tr_y)
    x, y = load_split_folder("mnist", tmp_path / "both", "test")
    assert np.array_equal(x[:, 0].numpy(), te_x) and np.array_equal(y.numpy(), te_y)
    (tmp_path / "train-only").mkdir()
    for stem in IDX_FILES[:2]:
        (tmp_path / "both" / f"{'.idx'.join(stem.rsplit('-idx', 1))}.gz").rename(tmp_path / "train-only" / f"{stem}.gz")
    assert load_split_folder("mnist", tmp_path / "train-only", "train")[1].shape == (12,)
    with pytest.raises(
        DataError, match="missing IDX file.* t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte .* test split"
    ):
        load_split_folder("mnist", tmp_path / "train-only", "test")
    images, labels = write_cifar_folder(tmp_path / "cifar", per_batch=4)
    for name in ("data_batch_3", "data_batch_4", "data_batch_5"):
        (tmp_path / "cifar" / name).unlink()  # a party may hold some of the batches
    x, y = load_split_folder("cifar10", tmp_path / "cifar", "train")
    assert np.array_equal(x.reshape(8, -1).numpy(), images[:8]) and np.array_equal(y.numpy(), labels[:8])
    assert load_split_folder("cifar10", tmp_path / "cifar", "test")[1].shape == (4,)
    with pytest.raises(DataError, match="does not exist"):
        load_split_folder("mnist", tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="not read from files"):
        load_split_folder("fmnist-sample", tmp_path / "both", "train")
    write_idx(tmp_path / "train-only" / f"{IDX_FILES[1]}.gz", np.full(12, 10, np.uint8), gz=True)
    with pytest.raises(DataError, match=r"train labels span \[10, 10\], expected 0..9"):
        load_split_folder("mnist", tmp_path / "train-only", "train")
