"""Tiny ImageNet in its tiny-imagenet-200 folder tree (its labelled val split serves as the test split)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from ..images import DataError, DatasetInfo, ImageSet
from .pillow import is_image_file, open_rgb


def _read_rgb_images(paths: list[Path], size: tuple[int, int]) -> torch.Tensor:
    out = np.empty((len(paths), size[0], size[1], 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        pixels = np.asarray(open_rgb(path))  # a few Tiny ImageNet JPEGs are greyscale
        if pixels.shape[:2] != size:
            raise DataError(f"{path}: {pixels.shape[1]}x{pixels.shape[0]} pixels, expected {size[1]}x{size[0]}")
        out[i] = pixels
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def read_tiny_imagenet(info: DatasetInfo, data_dir, _options=None) -> tuple[DatasetInfo, ImageSet, ImageSet]:
    layout = "wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt"
    if data_dir is None:
        raise DataError(
            "tiny_imagenet needs data_dir: unzip tiny-imagenet-200.zip and pass the tiny-imagenet-200 folder "
            f"({layout})"
        )
    root = Path(data_dir)
    if not (root / "wnids.txt").is_file() and (root / "tiny-imagenet-200" / "wnids.txt").is_file():
        root = root / "tiny-imagenet-200"
    wnids_path = root / "wnids.txt"
    if not wnids_path.is_file():
        raise DataError(
            f"tiny_imagenet: {wnids_path} not found; data_dir must be the tiny-imagenet-200 folder ({layout})"
        )
    # Labels index the sorted wnids (the usual folder-dataset convention), whatever order wnids.txt lists.
    wnids = sorted({line.strip() for line in wnids_path.read_text().splitlines() if line.strip()})
    if not wnids:
        raise DataError(f"tiny_imagenet: {wnids_path} lists no wnids")
    class_of = {wnid: index for index, wnid in enumerate(wnids)}

    train_paths: list[Path] = []
    train_labels: list[int] = []
    for wnid in wnids:
        folder = root / "train" / wnid / "images"
        files = sorted(p for p in folder.glob("*") if is_image_file(p)) if folder.is_dir() else []
        if not files:
            raise DataError(f"tiny_imagenet: no images in {folder} (wnid {wnid} is listed in {wnids_path})")
        train_paths += files
        train_labels += [class_of[wnid]] * len(files)

    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DataError(f"tiny_imagenet: {annotations} not found ({layout})")
    val_paths: list[Path] = []
    val_labels: list[int] = []
    for line_number, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DataError(f"{annotations}:{line_number}: expected tab-separated 'file<TAB>wnid...', got {line!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in class_of:
            raise DataError(f"{annotations}:{line_number}: wnid {wnid!r} is not listed in {wnids_path}")
        path = root / "val" / "images" / name
        if not path.is_file():
            raise DataError(f"{annotations}:{line_number}: image {path} not found")
        val_paths.append(path)
        val_labels.append(class_of[wnid])
    if not val_paths:
        raise DataError(f"tiny_imagenet: {annotations} lists no images")

    info = dataclasses.replace(info, num_classes=len(wnids), classes=tuple(wnids))
    train = ImageSet(_read_rgb_images(train_paths, info.input_size), torch.tensor(train_labels, dtype=torch.int64))
    test = ImageSet(_read_rgb_images(val_paths, info.input_size), torch.tensor(val_labels, dtype=torch.int64))
    return info, train, test
