"""What every dataset becomes: an ImageSet of uint8 tensors, its DatasetInfo, and the normalisation."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TrainingError


class DataError(TrainingError, ValueError):
    """A dataset is missing or malformed, or does not fit the settings; the message names the file or
    config key and says what to do."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_channels: int
    num_classes: int
    input_size: tuple[int, int]  # (H, W) of the network input
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    crop_padding: int  # zero padding before the random crop
    horizontal_flip: bool
    classes: tuple[str, ...] = ()  # class names in label order, where the format has them (image_folder)
    skipped: tuple[str, ...] = ()  # unreadable files left out on request (image_folder's skip_bad_images)


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


def concat(sets: list[ImageSet]) -> ImageSet:
    return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]))


def normalize(images_uint8: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 (N, C, H, W) or (C, H, W) -> float32 (x / 255 - mean) / std, on the images' device."""
    if images_uint8.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 images, got {images_uint8.dtype}")
    shape = (info.in_channels, 1, 1)
    mean = torch.tensor(info.mean, dtype=torch.float32, device=images_uint8.device).view(shape)
    std = torch.tensor(info.std, dtype=torch.float32, device=images_uint8.device).view(shape)
    return images_uint8.to(torch.float32).div_(255.0).sub_(mean).div_(std)


def measure_mean_std(images_uint8: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 (N, C, H, W) images on the [0, 1] scale: exact, from a
    256-bin histogram per channel, so memory stays at one channel's bytes whatever N is."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for channel in range(images_uint8.shape[1]):
        counts = torch.bincount(images_uint8[:, channel].reshape(-1), minlength=256).to(torch.float64)
        mean = float((counts * levels).sum() / counts.sum())
        means.append(mean)
        stds.append(float(((counts * (levels - mean) ** 2).sum() / counts.sum()).sqrt()))
    return tuple(means), tuple(stds)
