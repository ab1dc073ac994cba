"""In-memory image datasets (uint8 tensors) and a seeded, vectorised batch iterator.

Loaders read the original distribution formats: Fashion-MNIST IDX files, CIFAR python pickle batches and
the tiny-imagenet-200 folder tree. Augmentation (random crop with zero padding, horizontal flip) and
normalisation run per batch with plain torch ops: no DataLoader workers, no torchvision.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError
from .errors import TrainingError

REPO_ROOT = Path(__file__).resolve().parent.parent
# Where Fashion-MNIST is looked for when no data_dir is given, in order (tests may patch this).
FMNIST_SEARCH_DIRS: tuple[Path, ...] = (
    REPO_ROOT / "data" / "fashion-mnist",
    Path("/usr/share/datasets/fashion-mnist"),
)


class DataError(TrainingError):
    """A dataset is missing or malformed; the message says what to install or where to put what."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_channels: int
    num_classes: int
    input_size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    crop_padding: int  # zero padding before the random crop
    horizontal_flip: bool


DATASETS: dict[str, DatasetInfo] = {
    # Mean/std measured over each official train split.
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", 1, 10, (28, 28), (0.2860,), (0.3530,), crop_padding=2, horizontal_flip=True
    ),
    "cifar10": DatasetInfo(
        "cifar10", 3, 10, (32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        crop_padding=4, horizontal_flip=True,
    ),
    "cifar100": DatasetInfo(
        "cifar100", 3, 100, (32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        crop_padding=4, horizontal_flip=True,
    ),
    # num_classes is replaced by the number of wnids actually listed when the data is loaded.
    "tiny_imagenet": DatasetInfo(
        "tiny_imagenet", 3, 200, (64, 64), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
        crop_padding=8, horizontal_flip=True,
    ),
}


def dataset_info(dataset: str) -> DatasetInfo:
    """Static description of a dataset (tiny_imagenet's num_classes is the full 200 here)."""
    try:
        return DATASETS[dataset]
    except KeyError:
        raise DataError(f"unknown dataset {dataset!r}; known datasets: {', '.join(DATASETS)}") from None


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            shape = tuple(self.images.shape)
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {shape}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be int64 ({self.images.shape[0]},), got {self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, indices: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[indices], self.labels[indices])


def normalize(images_uint8: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 (N, C, H, W) or (C, H, W) -> float32 (x / 255 - mean) / std, on the images' device."""
    if images_uint8.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 images, got {images_uint8.dtype}")
    shape = (info.in_channels, 1, 1)
    mean = torch.tensor(info.mean, dtype=torch.float32, device=images_uint8.device).view(shape)
    std = torch.tensor(info.std, dtype=torch.float32, device=images_uint8.device).view(shape)
    return images_uint8.to(torch.float32).div_(255.0).sub_(mean).div_(std)


# ---------------------------------------------------------------------------------------------
# Splits


def _seed_from(*parts: object) -> int:
    """A 63-bit seed derived from the parts, so that each use (split, epoch n) gets its own stream."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _class_balanced_order(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
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
) -> tuple[DatasetInfo, ImageSet, ImageSet, ImageSet]:
    """(info, train, val, test).

    val (val_size examples, class-balanced) is carved out of the official train split, deterministic by
    seed and independent of train_subset; train is the rest, or a seeded class-balanced subset of
    train_subset examples of it. test is the official test split (Tiny ImageNet: its labelled val split).
    Each split keeps the file order; BatchIterator does the shuffling.
    """
    info = dataset_info(dataset)
    loaders = {
        "fashion_mnist": _load_fashion_mnist,
        "cifar10": _load_cifar10,
        "cifar100": _load_cifar100,
        "tiny_imagenet": _load_tiny_imagenet,
    }
    info, official_train, test = loaders[dataset](info, data_dir)

    n = len(official_train)
    if not 0 <= val_size < n:
        raise ConfigError(f"config key 'val_size': {val_size} must be in [0, {n}) for {dataset} ({n} official "
                          f"train examples); set a smaller val_size", "val_size")
    if train_subset is not None and not 0 < train_subset <= n - val_size:
        raise ConfigError(
            f"config key 'train_subset': {train_subset} must be in [1, {n - val_size}] for {dataset} ({n} official "
            f"train examples minus val_size={val_size}); set train_subset <= {n - val_size}, or null for all of "
            f"them", "train_subset")
    generator = torch.Generator().manual_seed(_seed_from("split", dataset, seed))
    order = _class_balanced_order(official_train.labels, generator)
    val_indices = order[:val_size]
    # The round-robin order continues after the val prefix, so the next train_subset are balanced too.
    train_end = n if train_subset is None else val_size + train_subset
    train_indices = order[val_size:train_end]
    train = official_train.subset(torch.sort(train_indices).values)
    val = official_train.subset(torch.sort(val_indices).values)
    return info, train, val, test


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)

_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 2051  # 0x0803: uint8, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x0801: uint8, 1 dimension


def _idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt gzip stream
        raise DataError(f"cannot read {path}: {e} (truncated or corrupt? re-run `make data`)") from e


def _parse_idx(path: Path, magic: int, header_ints: int) -> tuple[list[int], np.ndarray]:
    raw = _read_idx_bytes(path)
    header_size = 4 * header_ints
    if len(raw) < header_size:
        raise DataError(f"{path}: {len(raw)} bytes, shorter than the {header_size}-byte IDX header (truncated)")
    header = [int(v) for v in np.frombuffer(raw, dtype=">u4", count=header_ints)]
    if header[0] != magic:
        raise DataError(f"{path}: IDX magic number {header[0]}, expected {magic} (not this kind of IDX file)")
    expected = header_size + int(np.prod(header[1:]))
    if len(raw) != expected:
        raise DataError(
            f"{path}: {len(raw)} bytes but its header {header[1:]} implies {expected} "
            f"({'truncated' if len(raw) < expected else 'trailing data'})"
        )
    return header[1:], np.frombuffer(raw, dtype=np.uint8, offset=header_size)


def _read_idx_split(directory: Path, images_stem: str, labels_stem: str, num_classes: int) -> ImageSet:
    images_path, labels_path = _idx_file(directory, images_stem), _idx_file(directory, labels_stem)
    assert images_path is not None and labels_path is not None  # checked by the caller
    (count, rows, cols), pixels = _parse_idx(images_path, _IDX_IMAGES_MAGIC, 4)
    (label_count,), labels = _parse_idx(labels_path, _IDX_LABELS_MAGIC, 2)
    if label_count != count:
        raise DataError(f"{images_path} holds {count} images but {labels_path} holds {label_count} labels")
    if label_count and int(labels.max()) >= num_classes:
        raise DataError(f"{labels_path}: label {int(labels.max())} out of range for {num_classes} classes")
    images = torch.from_numpy(pixels.reshape(count, 1, rows, cols).copy())
    return ImageSet(images, torch.from_numpy(labels.astype(np.int64)))


def _has_fmnist(directory: Path) -> bool:
    return all(_idx_file(directory, stem) is not None for pair in _FMNIST_FILES.values() for stem in pair)


def _load_fashion_mnist(info: DatasetInfo, data_dir) -> tuple[DatasetInfo, ImageSet, ImageSet]:
    wanted = ", ".join(f"{stem}[.gz]" for pair in _FMNIST_FILES.values() for stem in pair)
    if data_dir is not None:
        directory = Path(data_dir)
        if not _has_fmnist(directory):
            missing = [s for p in _FMNIST_FILES.values() for s in p if _idx_file(directory, s) is None]
            raise DataError(
                f"fashion_mnist: {directory} lacks {', '.join(missing)}[.gz]; it must hold the IDX files "
                f"{wanted} (`scripts/get_fmnist.sh {directory}` puts them there)"
            )
    else:
        directory = next((d for d in FMNIST_SEARCH_DIRS if _has_fmnist(d)), None)
        if directory is None:
            raise DataError(
                f"fashion_mnist: IDX files ({wanted}) not found in "
                f"{' or '.join(str(d) for d in FMNIST_SEARCH_DIRS)}. Run `make data` (or "
                f"`scripts/get_fmnist.sh`), or `apt-get install dataset-fashion-mnist`, or pass data_dir"
            )
    train = _read_idx_split(directory, *_FMNIST_FILES["train"], info.num_classes)
    test = _read_idx_split(directory, *_FMNIST_FILES["test"], info.num_classes)
    for split, images in (("train", train), ("test", test)):
        if tuple(images.images.shape[1:]) != (info.in_channels, *info.input_size):
            shape = tuple(images.images.shape[1:])
            raise DataError(f"fashion_mnist {split} images in {directory} are {shape}, expected (1, 28, 28)")
    return info, train, test


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickle batches)


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


def _concat(sets: list[ImageSet]) -> ImageSet:
    return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]))


def _load_cifar10(info: DatasetInfo, data_dir) -> tuple[DatasetInfo, ImageSet, ImageSet]:
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    directory = _find_batch_dir(
        data_dir, "cifar10", "cifar-10-batches-py", train_files + ["test_batch"],
        "cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html)",
    )
    train = _concat([_read_cifar_batch(directory / f, b"labels", info.num_classes) for f in train_files])
    test = _read_cifar_batch(directory / "test_batch", b"labels", info.num_classes)
    return info, train, test


def _load_cifar100(info: DatasetInfo, data_dir) -> tuple[DatasetInfo, ImageSet, ImageSet]:
    directory = _find_batch_dir(
        data_dir, "cifar100", "cifar-100-python", ["train", "test"],
        "cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html)",
    )
    train = _read_cifar_batch(directory / "train", b"fine_labels", info.num_classes)
    test = _read_cifar_batch(directory / "test", b"fine_labels", info.num_classes)
    return info, train, test


# ---------------------------------------------------------------------------------------------
# Tiny ImageNet (tiny-imagenet-200 folder tree)

_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def _read_rgb_images(paths: list[Path], size: tuple[int, int]) -> torch.Tensor:
    try:
        from PIL import Image
    except ImportError as e:
        raise DataError("tiny_imagenet needs Pillow: `pip install Pillow`") from e
    out = np.empty((len(paths), size[0], size[1], 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))  # a few Tiny ImageNet JPEGs are greyscale
        except (OSError, ValueError) as e:
            raise DataError(f"cannot decode image {path}: {e}") from e
        if pixels.shape[:2] != size:
            raise DataError(f"{path}: {pixels.shape[1]}x{pixels.shape[0]} pixels, expected {size[1]}x{size[0]}")
        out[i] = pixels
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _load_tiny_imagenet(info: DatasetInfo, data_dir) -> tuple[DatasetInfo, ImageSet, ImageSet]:
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
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in _IMAGE_SUFFIXES) if folder.is_dir() else []
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

    info = dataclasses.replace(info, num_classes=len(wnids))
    train = ImageSet(_read_rgb_images(train_paths, info.input_size), torch.tensor(train_labels, dtype=torch.int64))
    test = ImageSet(_read_rgb_images(val_paths, info.input_size), torch.tensor(val_labels, dtype=torch.int64))
    return info, train, test


# ---------------------------------------------------------------------------------------------
# Batches


def _crop_and_flip(
    images: torch.Tensor, padding: int, offsets: torch.Tensor, flips: torch.Tensor
) -> torch.Tensor:
    """Per-example crop of the zero-padded images at offsets (B, 2) = (y, x), mirrored where flips (B,).

    One gather does both: output column x reads padded column ox + x, or ox + W - 1 - x when flipped.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    device = images.device
    rows = offsets[:, :1] + torch.arange(h, device=device)  # (B, H)
    columns = torch.arange(w, device=device).expand(b, w)
    columns = torch.where(flips[:, None], w - 1 - columns, columns) + offsets[:, 1:]  # (B, W)
    return padded[
        torch.arange(b, device=device)[:, None, None, None],
        torch.arange(c, device=device)[None, :, None, None],
        rows[:, None, :, None],
        columns[:, None, None, :],
    ]


class BatchIterator:
    """Batches of (normalised float32 images, int64 labels) on device.

    train=True: a fresh shuffle, random crops and flips per epoch, all drawn from a generator seeded by
    (seed, epoch) alone, so a run resumed at an epoch boundary sees exactly the same batches; the last
    partial batch is dropped. train=False: file order, no augmentation, every example once.

    shard=(rank, world_size) for data-parallel runs: in training each rank takes every world_size-th
    example of each global batch (batch_size stays the global batch), in evaluation a contiguous 1/world
    slice of the set; the shards of all ranks together are exactly the one-process batches.
    """

    def __init__(
        self,
        data: ImageSet,
        info: DatasetInfo,
        batch_size: int,
        train: bool,
        seed: int,
        device: str | torch.device = "cpu",
        shard: tuple[int, int] = (0, 1),
    ):
        rank, world_size = shard
        if not 0 <= rank < world_size:
            raise ValueError(f"shard {shard}: rank must lie in [0, world_size)")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if train and len(data) < batch_size:
            raise ConfigError(f"config key 'batch_size': train batches drop the last partial batch, and the "
                              f"{len(data)} train examples are fewer than batch_size {batch_size}; set a smaller "
                              f"batch_size or a larger train_subset", "batch_size")
        if train and batch_size % world_size:
            raise ConfigError(f"config key 'batch_size': {batch_size} (the global batch) must be a multiple of the "
                              f"{world_size} processes; set batch_size to a multiple of {world_size} or launch "
                              f"another number of processes", "batch_size")
        if not train and world_size > 1:
            n = len(data)
            data = data.subset(torch.arange(rank * n // world_size, (rank + 1) * n // world_size))
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        # uint8 on the device: 4x less memory than float, augmentation runs where the model runs.
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.info = info
        self.batch_size = batch_size
        self.train = train
        self.seed = seed

    def __len__(self) -> int:
        n = self.labels.shape[0]
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.labels.shape[0]
        if not self.train:
            for start in range(0, n, self.batch_size):
                stop = start + self.batch_size
                yield normalize(self.images[start:stop], self.info), self.labels[start:stop]
            return

        # Everything random for the epoch is drawn up front on a CPU generator: same draws on any device.
        generator = torch.Generator().manual_seed(_seed_from("epoch", self.seed, epoch))
        order = torch.randperm(n, generator=generator)
        padding = self.info.crop_padding
        offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        if not self.info.horizontal_flip:
            flips.zero_()
        order, offsets, flips = order.to(self.device), offsets.to(self.device), flips.to(self.device)
        for batch in range(len(self)):
            # This rank's examples of the global batch (all of them in one process).
            mine = slice(batch * self.batch_size + self.rank, (batch + 1) * self.batch_size, self.world_size)
            indices = order[mine]
            images = _crop_and_flip(self.images[indices], padding, offsets[mine], flips[mine])
            yield normalize(images, self.info), self.labels[indices]
