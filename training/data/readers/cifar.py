"""CIFAR-10 and CIFAR-100 in their python-version pickle batches."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from ..images import DataError, DatasetInfo, ImageSet, concat


def _find_batch_dir(data_dir, dataset: str, subfolder: str, files: list[str], source: str) -> Path:
    if data_dir is None:
        raise DataError(
            f"{dataset} needs data_dir: no copy ships with this project. Unpack {source} and pass the folder "
            f"holding {', '.join(files)} (or its parent, holding {subfolder}/)"
        )
    root = Path(data_dir)
    for directory in (root, root / subfolder):
        if all((directory / f).is_file() for f in files):
            return directory
    raise DataError(
        f"{dataset}: {root} (and {root / subfolder}) lack the python-version batches "
        f"{', '.join(f for f in files if not (root / f).is_file())}; unpack {source} there"
    )


def _read_cifar_batch(path: Path, labels_key: bytes, num_classes: int) -> ImageSet:
    # pickle can run arbitrary code while loading: only use it on trusted files (the official CIFAR batches).
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as e:  # unpickling raises many types on corrupt input
        raise DataError(f"cannot unpickle {path}: {type(e).__name__}: {e} (truncated or not a CIFAR batch?)") from e
    if not isinstance(batch, dict) or b"data" not in batch or labels_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: expected a dict with b'data' and {labels_key!r}, got {keys}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[labels_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: b'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {labels.shape} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels outside [0, {num_classes})")
    # Rows are the R, G, B planes one after the other, each 32x32 row-major: exactly (3, 32, 32).
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return ImageSet(images, torch.from_numpy(labels.astype(np.int64)))


def read_cifar10(info: DatasetInfo, data_dir, _options=None) -> tuple[DatasetInfo, ImageSet, ImageSet]:
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    directory = _find_batch_dir(
        data_dir, "cifar10", "cifar-10-batches-py", train_files + ["test_batch"],
        "cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html)",
    )
    train = concat([_read_cifar_batch(directory / f, b"labels", info.num_classes) for f in train_files])
    test = _read_cifar_batch(directory / "test_batch", b"labels", info.num_classes)
    return info, train, test


def read_cifar100(info: DatasetInfo, data_dir, _options=None) -> tuple[DatasetInfo, ImageSet, ImageSet]:
    directory = _find_batch_dir(
        data_dir, "cifar100", "cifar-100-python", ["train", "test"],
        "cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html)",
    )
    train = _read_cifar_batch(directory / "train", b"fine_labels", info.num_classes)
    test = _read_cifar_batch(directory / "test", b"fine_labels", info.num_classes)
    return info, train, test
