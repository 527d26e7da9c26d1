"""Decoding images the same way everywhere (training, evaluation, prediction), and what counts as unreadable.

Every image is turned upright by its EXIF Orientation tag first, as `datasets` and transformers' `load_image` do: a
phone photo then gives the same pixels as a path, as bytes, as a PIL image and as an upright copy. `convert("RGB")`
alone clips 16-bit and 32-bit images to white and mishandles float images; they are scaled to
8 bits here first. An image over PIL's decompression-bomb limit, or a path that is no regular file (a FIFO named
`pipe.png` would block forever), is unreadable like a corrupt file: callers skip it, log it by path and count it.
"""

from __future__ import annotations

import io
import os
import stat
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Everything PIL raises for a file it cannot decode (SyntaxError: some truncated PNG/GIF headers).
UNREADABLE_IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
# Bump when the decoder's output changes for some input; caches of decoded images key on it. 2: EXIF orientation.
DECODER_VERSION = 2


def to_rgb(image: Image.Image) -> Image.Image:
    """An upright 8-bit RGB copy of `image`, with high-bit-depth and float pixel values scaled rather than clipped."""
    image = ImageOps.exif_transpose(image)  # a copy without the tag, so applying it twice changes nothing
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        full_scale = 65535.0 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(pixels / full_scale * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        scale = 255.0 if pixels.max(initial=0) <= 1.0 else 1.0  # values in [0, 1], else already on the 8-bit scale
        image = Image.fromarray(np.clip(pixels * scale + 0.5, 0, 255).astype(np.uint8))
    return image.convert("RGB")


# The largest short side an image processor resizes to (CLIP 224/336, SigLIP up to 512): the bomb guard bounds the
# pixels an image has after that resize, not only in the file (a 3 KB 1000000x1 PNG becomes 224 x 224 million).
UPSCALED_SHORT_SIDE = 512
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default limit, used when Image.MAX_IMAGE_PIXELS is None


def check_upscaled_size(width: int, height: int) -> None:
    """Raise `DecompressionBombError` (unreadable: skipped and counted) when resizing the short side to
    `UPSCALED_SHORT_SIDE` would give more pixels than PIL's decompression-bomb limit."""
    limit = Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS
    short, long = sorted((max(width, 1), max(height, 1)))
    scale = max(UPSCALED_SHORT_SIDE / short, 1.0)
    if (short * scale) * (long * scale) > limit:
        raise Image.DecompressionBombError(
            f"image of {width}x{height} pixels would be {round(long * scale)}x{round(short * scale)} once resized for "
            f"the model, over the {limit} pixel limit (a decompression bomb)"
        )


def open_image_file(path: str | os.PathLike) -> BinaryIO:
    """An image file opened for reading; `OSError` (unreadable) for anything but a regular file. Opened without
    blocking, so a FIFO or a device is refused at once instead of read forever."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{os.fspath(path)} is not a regular file (a pipe, device or socket); only image files are read")
    return os.fdopen(fd, "rb")


def open_rgb(source: str | os.PathLike | bytes | Image.Image) -> Image.Image:
    """Decode a path, encoded bytes or a PIL image fully (so errors surface here, not later) to 8-bit RGB."""
    if isinstance(source, Image.Image):
        check_upscaled_size(*source.size)
        return to_rgb(source)
    with (
        io.BytesIO(source) if isinstance(source, bytes) else open_image_file(source) as file,
        Image.open(file) as image,
    ):
        check_upscaled_size(*image.size)  # from the header, before the pixels are decoded
        image.load()
        return to_rgb(image)


def decode_image_value(value) -> Image.Image:
    """A `datasets` image value (PIL image, or `{"bytes", "path"}` when not decoded) as 8-bit RGB."""
    if isinstance(value, Image.Image):
        return open_rgb(value)
    return open_rgb(value["bytes"] if value.get("bytes") else value["path"])
