"""Fashion-MNIST in its original IDX files (gzipped or not)."""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from ..images import DataError, DatasetInfo, ImageSet

REPO_ROOT = Path(__file__).resolve().parents[3]
# Where Fashion-MNIST is looked for when no data_dir is given, in order (tests may patch this).
FMNIST_SEARCH_DIRS: tuple[Path, ...] = (
    REPO_ROOT / "data" / "fashion-mnist",
    Path("/usr/share/datasets/fashion-mnist"),
)

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


def has_fmnist(directory: Path) -> bool:
    return all(_idx_file(directory, stem) is not None for pair in _FMNIST_FILES.values() for stem in pair)


def read_fashion_mnist(info: DatasetInfo, data_dir, _options=None) -> tuple[DatasetInfo, ImageSet, ImageSet]:
    wanted = ", ".join(f"{stem}[.gz]" for pair in _FMNIST_FILES.values() for stem in pair)
    if data_dir is not None:
        directory = Path(data_dir)
        if not has_fmnist(directory):
            missing = [s for p in _FMNIST_FILES.values() for s in p if _idx_file(directory, s) is None]
            raise DataError(
                f"fashion_mnist: {directory} lacks {', '.join(missing)}[.gz]; it must hold the IDX files "
                f"{wanted} (`scripts/get_fmnist.sh {directory}` puts them there)"
            )
    else:
        directory = next((d for d in FMNIST_SEARCH_DIRS if has_fmnist(d)), None)
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
