"""Decoding image files with Pillow, for the formats that ship PNG/JPEG files (Tiny ImageNet, image folders)."""
from __future__ import annotations

from pathlib import Path

from ..images import DataError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")  # matched case-insensitively


class UnreadableImage(DataError):
    """One image file that Pillow cannot decode; `path` names it."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"cannot decode image {path}: {reason}")
        self.path = path


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def open_rgb(path: Path, min_side: int | None = None):
    """The fully decoded image at `path` as an RGB PIL image (greyscale, palette and alpha images converted;
    camera EXIF orientation applied). With `min_side`, a JPEG may decode at a reduced scale (Pillow's draft
    mode: several times faster for photos) as long as both sides stay at least `min_side`."""
    try:
        from PIL import Image, ImageOps
    except ImportError as e:
        raise DataError("reading PNG/JPEG images needs Pillow: `pip install pillow`") from e
    try:
        with Image.open(path) as image:
            if min_side is not None:
                image.draft("RGB", (min_side, min_side))
            return ImageOps.exif_transpose(image).convert("RGB")
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise UnreadableImage(path, f"{type(e).__name__}: {e}") from e


def fit_square(image, side: int):
    """The central square of `image` after scaling its shorter side to `side` (antialiased when shrinking)."""
    from PIL import Image, ImageOps

    return ImageOps.fit(image, (side, side), Image.Resampling.BILINEAR, centering=(0.5, 0.5))
