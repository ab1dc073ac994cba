"""Train / val / test splits: seeded, class-balanced, and what a run reports about them."""
from __future__ import annotations

import hashlib
import os
from typing import Any

import torch

from .augment import center_crop
from .images import DataError, DatasetInfo, ImageSet
from .readers.image_folder import FolderOptions
from .registry import dataset_entry, dataset_info

# How many skipped file names a summary lists (the count is always complete).
LISTED_SKIPPED = 20


def seed_from(*parts: object) -> int:
    """A 63-bit seed derived from the parts, so that each use (split, epoch n) gets its own stream."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def class_balanced_order(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random permutation in which any prefix holds the classes as evenly as their sizes allow.

    Shuffle, rank each example within its class, then stable-sort by that rank: the order visits
    the classes round-robin (in shuffled order within each round).
    """
    n = labels.shape[0]
    perm = torch.randperm(n, generator=generator)
    shuffled = labels[perm]
    by_class, positions = torch.sort(shuffled, stable=True)
    counts = torch.bincount(by_class)
    class_start = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.int64)
    rank[positions] = torch.arange(n) - class_start[by_class]
    return perm[torch.sort(rank, stable=True).indices]


def load_splits(
    dataset: str,
    data_dir: str | os.PathLike | None,
    train_subset: int | None,
    val_size: int,
    seed: int,
    options: FolderOptions | None = None,
) -> tuple[DatasetInfo, ImageSet, ImageSet, ImageSet]:
    """(info, train, val, test).

    val (val_size examples, class-balanced) is carved out of the official train split, deterministic by
    seed and independent of train_subset; train is the rest, or a seeded class-balanced subset of
    train_subset examples of it. test is the official test split (Tiny ImageNet: its labelled val split;
    image_folder: val/). Each split keeps the file order; BatchIterator does the shuffling.
    val and test come at the network's input size; train images may be larger by the room random
    training windows move in (image_folder with crop: random). `options` are image_folder's settings.
    """
    info = dataset_info(dataset, options)
    info, official_train, test = dataset_entry(dataset).read(info, data_dir, options or FolderOptions())

    n = len(official_train)
    if not 0 <= val_size < n:
        raise DataError(f"config key 'val_size': {val_size} must be in [0, {n}) for {dataset} "
                        f"({n} official train examples); set a smaller val_size")
    if train_subset is not None and not 0 < train_subset <= n - val_size:
        raise DataError(
            f"config key 'train_subset': {train_subset} must be in [1, {n - val_size}] for {dataset} "
            f"({n} official train examples minus val_size={val_size}); set train_subset <= {n - val_size}, "
            f"or null for all of them"
        )
    generator = torch.Generator().manual_seed(seed_from("split", dataset, seed))
    order = class_balanced_order(official_train.labels, generator)
    val_indices = order[:val_size]
    # The round-robin order continues after the val prefix, so the next train_subset are balanced too.
    train_end = n if train_subset is None else val_size + train_subset
    train_indices = order[val_size:train_end]
    train = official_train.subset(torch.sort(train_indices).values)
    val = official_train.subset(torch.sort(val_indices).values)
    val, test = (ImageSet(center_crop(s.images, info.input_size).contiguous(), s.labels) for s in (val, test))
    return info, train, val, test


def describe_splits(info: DatasetInfo, train: ImageSet, val: ImageSet, test: ImageSet) -> dict[str, Any]:
    """The facts about the data a run used, for metrics.json."""
    summary: dict[str, Any] = {
        "name": info.name, "num_classes": info.num_classes, "input_size": list(info.input_size),
        "in_channels": info.in_channels, "mean": list(info.mean), "std": list(info.std),
        "train_examples": len(train), "val_examples": len(val), "test_examples": len(test),
    }
    if info.classes:
        summary["classes"] = list(info.classes)
    summary["skipped_images"] = len(info.skipped)  # image_folder's skip_bad_images; 0 elsewhere
    if info.skipped:
        summary["skipped_files"] = list(info.skipped[:LISTED_SKIPPED])
    return summary
