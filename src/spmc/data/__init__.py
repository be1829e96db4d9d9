"""Datasets, partition and batch transforms (spec §1.2).

Sources (registry ``DATASETS``): ``fmnist`` and ``mnist`` from IDX files, ``cifar10`` from the python pickle
batches, ``fmnist-sample`` (the default) embedded in the package, ``synthetic`` generated from a seed.
Images are kept in memory as uint8 ``[N, C, H, W]`` tensors, labels as int64 ``[N]``; transforms work on whole
batches.
"""

from __future__ import annotations

from spmc.data.datasets import (
    EMBEDDED_SAMPLE,
    EMBEDDED_SAMPLE_LICENSE,
    RawDataset,
    load_dataset,
    load_embedded_sample,
)
from spmc.data.errors import DataError
from spmc.data.partition import dirichlet_partition
from spmc.data.readers import (
    CIFAR10_FILES,
    DATA_DIR_ENV,
    IDX_FILES,
    load_cifar10_folder,
    load_idx_folder,
    load_split_folder,
    read_idx,
    resolve_data_dir,
)
from spmc.data.registry import CIFAR10_MEAN, CIFAR10_STD, DATASETS, MNIST_MEAN, MNIST_STD, DatasetInfo
from spmc.data.synthetic import make_synthetic
from spmc.data.transforms import (
    Preprocessor,
    normalize,
    random_crop,
    random_hflip,
    server_split,
    to_three_channels,
    to_unit_float,
)

#: The dataset used when none is named.
DEFAULT_DATASET = "fmnist-sample"

__all__ = [
    "CIFAR10_FILES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "DATA_DIR_ENV",
    "DEFAULT_DATASET",
    "EMBEDDED_SAMPLE",
    "EMBEDDED_SAMPLE_LICENSE",
    "IDX_FILES",
    "MNIST_MEAN",
    "MNIST_STD",
    "DataError",
    "DatasetInfo",
    "Preprocessor",
    "RawDataset",
    "dirichlet_partition",
    "load_cifar10_folder",
    "load_dataset",
    "load_embedded_sample",
    "load_idx_folder",
    "load_split_folder",
    "make_synthetic",
    "normalize",
    "random_crop",
    "random_hflip",
    "read_idx",
    "resolve_data_dir",
    "server_split",
    "to_three_channels",
    "to_unit_float",
]
