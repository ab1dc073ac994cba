"""Windows and flips on uint8 batches, with plain torch ops (no torchvision): the random training window
(in zero padding and/or a stored image larger than the input) with its mirror in one gather, and the
central window for evaluation."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_room(stored_size: tuple[int, int], input_size: tuple[int, int], padding: int) -> int:
    """How many pixels a training window can move in each direction: padded stored size minus input size.
    Stored images exceed the input equally in height and width (a square margin, drawn as one range)."""
    room = [s + 2 * padding - i for s, i in zip(stored_size, input_size)]
    if room[0] != room[1] or room[0] < 0:
        raise ValueError(f"stored images {tuple(stored_size)} with padding {padding} must exceed the input "
                         f"{tuple(input_size)} by the same margin in height and width")
    return room[0]


def crop_and_flip(
    images: torch.Tensor, padding: int, input_size: tuple[int, int], offsets: torch.Tensor, flips: torch.Tensor
) -> torch.Tensor:
    """Per-example input_size window of the zero-padded images at offsets (B, 2) = (y, x), mirrored where
    flips (B,).

    One gather does both: output column x reads padded column ox + x, or ox + W - 1 - x when flipped.
    """
    b, c = images.shape[:2]
    h, w = input_size
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


def center_crop(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The central size = (H, W) window of (..., H', W') images (the images themselves when H', W' = H, W)."""
    top = (images.shape[-2] - size[0]) // 2
    left = (images.shape[-1] - size[1]) // 2
    if top < 0 or left < 0:
        raise ValueError(f"images {tuple(images.shape[-2:])} are smaller than the window {tuple(size)}")
    return images[..., top:top + size[0], left:left + size[1]]
