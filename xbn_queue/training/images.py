"""What both trainers read images with: the file extensions they accept, the unreadable-image error, digits."""

from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["IMAGE_EXTENSIONS", "BadImageError", "digits_uint8"]

#: File suffixes (lower case) that count as images in a folder dataset.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class BadImageError(RuntimeError):
    """An image file that cannot be decoded; the message names the file."""


def digits_uint8() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as uint8 grayscale (values 0..16 scaled to 0..255).

    Returns:
        ``(images (1797, 8, 8) uint8, labels (1797,) int64)``.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (1797, 8, 8)
    return images, d.target.astype(np.int64)
