"""Decoding images the same way everywhere (training, evaluation, prediction), and what counts as unreadable.

`convert("RGB")` alone clips 16-bit and 32-bit images to white and mishandles float images; they are scaled to
8 bits here first. An image over PIL's decompression-bomb limit is unreadable like a corrupt file: callers skip
it, log it by path and count it.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

# Everything PIL raises for a file it cannot decode (SyntaxError: some truncated PNG/GIF headers).
UNREADABLE_IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of `image`, with high-bit-depth and float pixel values scaled rather than clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        full_scale = 65535.0 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(pixels / full_scale * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        scale = 255.0 if pixels.max(initial=0) <= 1.0 else 1.0  # values in [0, 1], else already on the 8-bit scale
        image = Image.fromarray(np.clip(pixels * scale + 0.5, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def open_rgb(source: str | os.PathLike | bytes | Image.Image) -> Image.Image:
    """Decode a path, encoded bytes or a PIL image fully (so errors surface here, not later) to 8-bit RGB."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.load()
        return to_rgb(image)
