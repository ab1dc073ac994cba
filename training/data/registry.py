"""The one registry of datasets: name -> static description and the reader of its files.

training/config.py validates `dataset` against DATASETS; load_splits reads through it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .images import DataError, DatasetInfo, ImageSet
from .readers.cifar import read_cifar10, read_cifar100
from .readers.fashion_mnist import read_fashion_mnist
from .readers.image_folder import FolderOptions, configure_info, read_image_folder
from .readers.tiny_imagenet import read_tiny_imagenet

Reader = Callable[[DatasetInfo, object, FolderOptions], tuple[DatasetInfo, ImageSet, ImageSet]]


@dataclass(frozen=True)
class Dataset:
    info: DatasetInfo  # what is known before reading; a reader may fill in classes (and image_folder: stats)
    read: Reader  # (info, data_dir, options) -> (info, official train split, test split)
    # image_folder: how the config's options shape `info` before any file is read (None: fixed by the format)
    configure: Callable[[DatasetInfo, FolderOptions], DatasetInfo] | None = None


DATASETS: dict[str, Dataset] = {
    # Mean/std measured over each official train split.
    "fashion_mnist": Dataset(
        DatasetInfo("fashion_mnist", 1, 10, (28, 28), (0.2860,), (0.3530,), crop_padding=2, horizontal_flip=True),
        read_fashion_mnist,
    ),
    "cifar10": Dataset(
        DatasetInfo("cifar10", 3, 10, (32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                    crop_padding=4, horizontal_flip=True),
        read_cifar10,
    ),
    "cifar100": Dataset(
        DatasetInfo("cifar100", 3, 100, (32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                    crop_padding=4, horizontal_flip=True),
        read_cifar100,
    ),
    # num_classes is replaced by the number of wnids actually listed when the data is read.
    "tiny_imagenet": Dataset(
        DatasetInfo("tiny_imagenet", 3, 200, (64, 64), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                    crop_padding=8, horizontal_flip=True),
        read_tiny_imagenet,
    ),
    # Input size and flips come from the options; classes (placeholder: 2, the fewest a classifier has),
    # mean and std (placeholder: 0.5) from the folder when it is read.
    "image_folder": Dataset(
        DatasetInfo("image_folder", 3, 2, (64, 64), (0.5,) * 3, (0.5,) * 3, crop_padding=0, horizontal_flip=True),
        read_image_folder, configure_info,
    ),
}


def dataset_entry(dataset: str) -> Dataset:
    try:
        return DATASETS[dataset]
    except KeyError:
        raise DataError(f"unknown dataset {dataset!r}; known datasets: {', '.join(DATASETS)}") from None


def dataset_info(dataset: str, options: FolderOptions | None = None) -> DatasetInfo:
    """What is known of a dataset before reading its files (tiny_imagenet's num_classes is the full 200 here,
    image_folder's the placeholder 2: both count classes when read)."""
    entry = dataset_entry(dataset)
    return entry.configure(entry.info, options or FolderOptions()) if entry.configure else entry.info
