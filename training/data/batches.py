"""The batch iterator: seeded, augmented on the device, sharded across data-parallel ranks."""
from __future__ import annotations

from typing import Iterator

import torch

from .augment import crop_and_flip, crop_room
from .images import DataError, DatasetInfo, ImageSet, normalize
from .splits import seed_from


class BatchIterator:
    """Batches of (normalised float32 images, int64 labels) on device.

    train=True: a fresh shuffle, random windows and flips per epoch, all drawn from a generator seeded by
    (seed, epoch) alone, so a run resumed at an epoch boundary sees exactly the same batches; the last
    partial batch is dropped. A window moves within the zero padding (info.crop_padding) and within images
    stored larger than the input (image_folder's crop: random). train=False: file order, no augmentation,
    every example once; images must be at the input size (load_splits gives val and test that way).

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
            raise DataError(
                f"config key 'batch_size': train batches drop the last partial batch, and the {len(data)} "
                f"training examples are fewer than batch_size {batch_size}; set a smaller batch_size or a "
                f"larger train_subset"
            )
        if train and batch_size % world_size:
            raise DataError(f"config key 'batch_size': {batch_size} (the global batch) must be a multiple of the "
                            f"{world_size} processes; set a multiple of {world_size}, or launch another number of "
                            f"processes")
        stored = tuple(data.images.shape[2:])
        self.room = crop_room(stored, info.input_size, info.crop_padding if train else 0)
        if not train and self.room:
            raise ValueError(f"evaluation images are {stored}, the network takes {tuple(info.input_size)}")
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
        generator = torch.Generator().manual_seed(seed_from("epoch", self.seed, epoch))
        order = torch.randperm(n, generator=generator)
        offsets = torch.randint(0, self.room + 1, (n, 2), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        if not self.info.horizontal_flip:
            flips.zero_()
        order, offsets, flips = order.to(self.device), offsets.to(self.device), flips.to(self.device)
        padding, input_size = self.info.crop_padding, self.info.input_size
        for batch in range(len(self)):
            # This rank's examples of the global batch (all of them in one process).
            mine = slice(batch * self.batch_size + self.rank, (batch + 1) * self.batch_size, self.world_size)
            indices = order[mine]
            images = crop_and_flip(self.images[indices], padding, input_size, offsets[mine], flips[mine])
            yield normalize(images, self.info), self.labels[indices]
