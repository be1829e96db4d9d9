"""The dataset registry: one :class:`DatasetInfo` per dataset name (spec §1.1, §1.2; a plain dict)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from spmc.plugins import DATASET, load_entry_points

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "DATASETS", "DatasetInfo", "MNIST_MEAN", "MNIST_STD"]

#: MNIST statistics, used on each of the 3 channels for MNIST, Fashion-MNIST (spec D16) and the synthetic set.
MNIST_MEAN: tuple[float, float, float] = (0.1307, 0.1307, 0.1307)
MNIST_STD: tuple[float, float, float] = (0.3081, 0.3081, 0.3081)
#: CIFAR-10 statistics (spec §1.2).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2615)


@dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the package needs to know about a dataset.

    ``mean``/``std`` are the per-channel Normalize statistics of the 3-channel input; ``hflip`` says whether
    client training uses RandomHorizontalFlip(0.5); ``model`` is the default backbone (spec §1.1, §1.2).
    ``train_size`` is the number of official training images (None: set by the configuration, ``synthetic``).
    ``server_augmentation`` is what the server's clean split is augmented with when a defense trains on it (spec §5,
    D38): ``train`` (the clients' training transform) or ``strong`` (:func:`spmc.data.strong_aug.strong_augment`).
    ``class_names`` are readable class names (empty: the class index is its name, as for digits).
    ``source`` is where the images come from: ``idx`` files or CIFAR-10's python batches (``cifar10``) in a data
    folder, the sample embedded in the package (``embedded``) or a seeded generator (``synthetic``); for the file
    sources, ``subdirs`` are the sub-folders tried below every search root and ``system_dirs`` the folders searched
    last (:func:`spmc.data.readers.resolve_data_dir`); ``install_hint`` is added to the error when no folder holds
    the files.
    """

    name: str
    description: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hflip: bool
    model: str
    num_classes: int = 10
    train_size: int | None = None
    server_augmentation: Literal["train", "strong"] = "train"
    class_names: tuple[str, ...] = ()
    source: Literal["idx", "cifar10", "embedded", "synthetic"] = "idx"
    subdirs: tuple[str, ...] = ()
    system_dirs: tuple[str, ...] = ()
    install_hint: str = ""


FMNIST_CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")
CIFAR10_CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _mnist_like(
    name: str,
    description: str,
    train_size: int | None,
    class_names: tuple[str, ...] = (),
    source: Literal["idx", "embedded", "synthetic"] = "idx",
    subdirs: tuple[str, ...] = (),
    system_dirs: tuple[str, ...] = (),
    install_hint: str = "",
) -> DatasetInfo:
    """MNIST statistics on 3 channels, no flip, SimpleCNN (spec §1.1, §1.2, D16)."""
    return DatasetInfo(
        name,
        description,
        MNIST_MEAN,
        MNIST_STD,
        hflip=False,
        model="simplecnn",
        train_size=train_size,
        class_names=class_names,
        source=source,
        subdirs=subdirs,
        system_dirs=system_dirs,
        install_hint=install_hint,
    )


_CIFAR10_DESCRIPTION = "CIFAR-10 (50k/10k), from the python pickle batches"

_CIFAR_SUBDIR = "cifar-10-batches-py"

DATASETS: dict[str, DatasetInfo] = {
    "fmnist": _mnist_like(
        "fmnist",
        "Fashion-MNIST, full (60k/10k), from IDX files",
        60_000,
        FMNIST_CLASSES,
        subdirs=("fashion-mnist", "fmnist", "FashionMNIST/raw"),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        install_hint="On Debian/Ubuntu, `apt-get install dataset-fashion-mnist` installs them in "
        "/usr/share/datasets/fashion-mnist, which is searched automatically.",
    ),
    "mnist": _mnist_like("mnist", "MNIST, full (60k/10k), from IDX files", 60_000, subdirs=("mnist", "MNIST/raw")),
    "cifar10": DatasetInfo(
        "cifar10",
        _CIFAR10_DESCRIPTION,
        CIFAR10_MEAN,
        CIFAR10_STD,
        True,
        "resnet10",
        train_size=50_000,
        server_augmentation="strong",
        class_names=CIFAR10_CLASSES,
        source="cifar10",
        subdirs=(_CIFAR_SUBDIR, "cifar10", f"cifar10/{_CIFAR_SUBDIR}"),
    ),
    "fmnist-sample": _mnist_like(
        "fmnist-sample",
        "Fashion-MNIST sample shipped with spmc (6k/1k), default",
        6_000,
        FMNIST_CLASSES,
        source="embedded",
    ),
    "synthetic": _mnist_like(
        "synthetic", "Synthetic 10-class 28x28 images from a seed (for tests)", None, source="synthetic"
    ),
}
load_entry_points("spmc.datasets", DATASETS, DATASET)
