"""dataset: image_folder, the user's own images: data_dir/train/<class>/... and data_dir/val/<class>/...

Classes are the sorted names of train/'s sub-folders (label i is the i-th name); val/ must hold sub-folders
of exactly those names. Within a class folder (sub-folders included) every *.png, *.jpg and *.jpeg file is
an example; other files and anything hidden (.*) are ignored.

Splits: train/ is the official train split, so `val_size` examples are carved out of it (seeded,
class-balanced) as for the built-in sets; val/ is the TEST split: test_accuracy in metrics.json and the
real images of the export stage come from it.

Pixels: each file is decoded once (RGB; greyscale and alpha converted, camera EXIF orientation applied),
its shorter side scaled to `resize` (default: image_size) and its central resize x resize square kept.
Evaluation sees the central image_size window of that square; training sees the same (crop: center) or a
fresh random window every epoch (crop: random, which needs resize > image_size), mirrored half of the time
unless horizontal_flip is off.

Why decode once, into memory, as uint8: the whole data path (seeded class-balanced splits, augmentation
vectorised on the device, each rank's shard of every global batch, identical batches after a resume) works
on one uint8 tensor, and decoding once keeps image folders on that path instead of beside it. It costs
N x 3 x resize^2 bytes per process (1.5 GB for 100k images at resize 72); without DataLoader workers, lazy
decoding would instead pay Pillow's decode for every image in every epoch. A set needing more than half of
the machine's memory is refused with that arithmetic.

Normalisation: by default the per-channel mean and std measured over every image decoded from train/
(before the val carve-out, so that training and export, which loads with val_size 0, derive the same
numbers from the same files). normalize_mean/normalize_std fix them instead: use the statistics that
pretrained weights were trained with (ImageNet: 0.485,0.456,0.406 and 0.229,0.224,0.225).

Unreadable files stop loading with an error naming the file, unless skip_bad_images is set: then they are
left out, and their count and names are reported (metrics.json, "data").
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..images import DataError, DatasetInfo, ImageSet, measure_mean_std
from .pillow import IMAGE_SUFFIXES, UnreadableImage, fit_square, is_image_file, open_rgb

NAME = "image_folder"
CROPS = ("center", "random")
LAYOUT = "train/<class>/*.png|jpg|jpeg and val/<class>/... (the same class folders in both)"


@dataclass(frozen=True)
class FolderOptions:
    """How image_folder turns files into network inputs. Each field is a training config key (same name,
    same default); see the module docstring for what they do."""
    image_size: int = 64                         # side of the square network input
    resize: int | None = None                    # shorter side scaled to this first (None: image_size)
    crop: str = "center"                         # training window: "center" or "random"
    horizontal_flip: bool = True                 # training mirrors half of the images
    normalize_mean: tuple[float, ...] | None = None  # per RGB channel on [0, 1]; None: measured on train/
    normalize_std: tuple[float, ...] | None = None
    skip_bad_images: bool = False                # leave unreadable files out (reported) instead of failing

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FolderOptions:
        """The options a training config (a TrainConfig's dict, or a checkpoint's) holds; keys it lacks (a run
        made before image folders existed) take their defaults."""
        values = {f.name: config[f.name] for f in fields(cls) if f.name in config}
        for key in ("normalize_mean", "normalize_std"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)

    @property
    def stored_side(self) -> int:
        """Side of the square kept in memory per image: the room random crops move in."""
        return self.resize or self.image_size

    def problems(self, dataset: str) -> list[tuple[str, str]]:
        """(config key, what is wrong) for every setting that cannot work with `dataset`."""
        if dataset != NAME:
            return [(f.name, f"applies to dataset {NAME} only (dataset is {dataset!r})")
                    for f in fields(self) if getattr(self, f.name) != f.default]
        found = []
        if self.image_size < 8:
            found.append(("image_size", "must be at least 8"))
        if self.resize is not None and self.resize < self.image_size:
            found.append(("resize", f"must be at least image_size ({self.image_size}): the shorter side is scaled "
                                    "to it, then an image_size window is cut out"))
        if self.crop not in CROPS:
            found.append(("crop", f"must be one of {', '.join(CROPS)}"))
        elif self.crop == "random" and self.stored_side <= self.image_size:
            found.append(("crop", f"random windows need room: set resize above image_size ({self.image_size}), "
                                  f"e.g. resize: {math.ceil(self.image_size * 8 / 7)}"))
        given = [key for key in ("normalize_mean", "normalize_std") if getattr(self, key) is not None]
        if len(given) == 1:
            found.append((given[0], "give normalize_mean and normalize_std together, or neither (then both are "
                                    "measured on train/)"))
        for key in given:
            values = getattr(self, key)
            if len(values) != 3:
                found.append((key, "needs 3 values, one per channel (R, G, B), on the [0, 1] pixel scale"))
            elif not all(math.isfinite(v) for v in values) or (key == "normalize_std" and min(values) <= 0):
                found.append((key, "must be finite" + (" and positive" if key == "normalize_std" else "")))
        return found


def configure_info(info: DatasetInfo, options: FolderOptions) -> DatasetInfo:
    """What the options fix before any file is read: input size and flips (classes come with the folder)."""
    return dataclasses.replace(info, input_size=(options.image_size, options.image_size),
                               horizontal_flip=options.horizontal_flip)


def _folders(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_classes(root: Path) -> list[str]:
    """The class names (sorted train/ sub-folders), once val/ is checked to hold the same ones."""
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"{NAME}: {root / split} is not a folder; data_dir must hold {LAYOUT}")
    classes = _folders(root / "train")
    if len(classes) < 2:
        raise DataError(f"{NAME}: {root / 'train'} holds {len(classes)} class folder(s); a classifier needs at "
                        f"least 2 ({LAYOUT})")
    val_classes = _folders(root / "val")
    if val_classes != classes:
        missing = sorted(set(classes) - set(val_classes))
        extra = sorted(set(val_classes) - set(classes))
        raise DataError(f"{NAME}: {root / 'val'} must hold the same class folders as {root / 'train'}; "
                        + "; ".join(part for part in (f"missing in val/: {', '.join(missing)}" if missing else "",
                                                      f"not in train/: {', '.join(extra)}" if extra else "") if part))
    return classes


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _listing(split_dir: Path, classes: list[str], every_class: bool) -> tuple[list[Path], list[int]]:
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = _image_files(split_dir / name)
        if every_class and not files:
            raise DataError(f"{NAME}: no images in {split_dir / name} (looked for {', '.join(IMAGE_SUFFIXES)}; "
                            "every class needs training images)")
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"{NAME}: no images in {split_dir}/<class>/ (looked for {', '.join(IMAGE_SUFFIXES)})")
    return paths, labels


def _check_memory(count: int, side: int, root: Path) -> None:
    need = count * 3 * side * side
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf: nothing to compare against
        return
    if need > total // 2:
        raise DataError(f"{NAME}: {count} images in {root} at {side}x{side} take {need / 2**30:.1f} GiB decoded, "
                        f"more than half of this machine's {total / 2**30:.1f} GiB (images are held in memory, "
                        "per process); lower resize/image_size or use fewer images")


def _decode(paths: list[Path], labels: list[int], side: int, skip_bad: bool, skipped: list[Path]) -> ImageSet:
    pixels = np.empty((len(paths), side, side, 3), dtype=np.uint8)
    kept: list[int] = []
    for index, path in enumerate(paths):
        try:
            image = open_rgb(path, min_side=side)
        except UnreadableImage as error:
            if not skip_bad:
                raise DataError(f"{NAME}: {error}. Fix or delete the file, or set skip_bad_images: true to leave "
                                "unreadable images out (they are counted in metrics.json)") from error
            skipped.append(path)
            continue
        pixels[len(kept)] = np.asarray(fit_square(image, side))
        kept.append(labels[index])
    images = torch.from_numpy(pixels[:len(kept)]).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.tensor(kept, dtype=torch.int64))


def read_image_folder(info: DatasetInfo, data_dir, options: FolderOptions) -> tuple[DatasetInfo, ImageSet, ImageSet]:
    if data_dir is None:
        raise DataError(f"{NAME} needs data_dir: the folder holding {LAYOUT}")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{NAME}: data_dir {root} is not a folder; it must hold {LAYOUT}")
    classes = folder_classes(root)
    train_files = _listing(root / "train", classes, every_class=True)
    test_files = _listing(root / "val", classes, every_class=False)
    side = options.stored_side
    _check_memory(len(train_files[0]) + len(test_files[0]), side, root)

    skipped: list[Path] = []
    train = _decode(*train_files, side, options.skip_bad_images, skipped)
    test = _decode(*test_files, side, options.skip_bad_images, skipped)
    if len(test) == 0:
        raise DataError(f"{NAME}: every image in {root / 'val'} is unreadable")
    counts = torch.bincount(train.labels, minlength=len(classes))
    if int(counts.min()) == 0:
        empty = [classes[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
        raise DataError(f"{NAME}: every image of class {', '.join(empty)} in {root / 'train'} is unreadable")

    if options.normalize_mean is not None and options.normalize_std is not None:
        mean, std = options.normalize_mean, options.normalize_std
    else:
        mean, std = measure_mean_std(train.images)
        if min(std) == 0:
            raise DataError(f"{NAME}: the images in {root / 'train'} have a channel without any variation "
                            "(std 0); set normalize_mean and normalize_std")
    info = dataclasses.replace(info, num_classes=len(classes), mean=tuple(mean), std=tuple(std),
                               classes=tuple(classes), skipped=tuple(str(p) for p in skipped))
    return info, train, test
