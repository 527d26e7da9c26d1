"""A phone photo: a JPEG whose pixels are stored sideways with an EXIF Orientation tag. Every path of the project
decodes it upright, as `datasets` and transformers' `load_image` do, so a path and an upright copy give the same
pixels, the same training squares and the same scores."""

from __future__ import annotations

import io

import numpy as np
import pytest
from helpers import CLASS_NAMES
from peft import get_peft_model
from PIL import Image

from dpt_peft import DPTConfig
from dpt_peft.data import decoded_cache
from dpt_peft.data.images import DECODER_VERSION, decode_image_value, open_rgb
from dpt_peft.integrations.inference import predict
from dpt_peft.integrations.pipeline import read_image

ORIENTATION = 0x0112


@pytest.fixture
def upright() -> Image.Image:
    """A landscape image with a distinct top-left corner, so a rotation or flip shows."""
    pixels = np.zeros((24, 40, 3), dtype=np.uint8)
    pixels[:, :, 2] = 90
    pixels[:8, :12] = (250, 20, 20)
    pixels[-6:, 20:] = (20, 240, 40)
    return Image.fromarray(pixels)


@pytest.fixture
def phone_photo(tmp_path, upright) -> str:
    """`upright` stored as a phone stores a portrait shot: pixels rotated, Orientation 6 ("rotate 90 CW to view")."""
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what exif_transpose undoes for orientation 6
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=100, subsampling=0)
    return str(path)


def same_pixels(a: Image.Image, b: Image.Image, tolerance: int = 12) -> bool:
    """Equal up to JPEG's loss (the upright reference is never compressed)."""
    return a.size == b.size and int(np.abs(np.asarray(a, int) - np.asarray(b, int)).max()) <= tolerance


def test_every_decoder_entry_turns_the_photo_upright(phone_photo, upright):
    with open(phone_photo, "rb") as f:
        data = f.read()
    assert Image.open(phone_photo).size == (24, 40)  # stored sideways
    for decoded in (
        open_rgb(phone_photo),
        open_rgb(data),
        open_rgb(Image.open(phone_photo)),
        decode_image_value({"path": phone_photo, "bytes": None}),
        decode_image_value({"path": None, "bytes": data}),
        read_image(phone_photo),  # the pipeline's reader
        read_image(data),
    ):
        assert same_pixels(decoded, upright)
    assert same_pixels(open_rgb(open_rgb(phone_photo)), upright)  # applying it twice changes nothing


def test_the_decoded_cache_keys_on_the_decoder_version(tmp_path, phone_photo, upright):
    square = decoded_cache.to_cached_square(decode_image_value({"path": phone_photo, "bytes": None}), 16)
    assert np.abs(square.astype(int) - decoded_cache.to_cached_square(upright, 16).astype(int)).max() <= 12
    assert DECODER_VERSION >= 2  # 2: EXIF orientation; squares decoded before are not reused
    assert f"d{DECODER_VERSION}" in decoded_cache.decoder_settings()  # part of the store's folder name


def test_a_path_and_the_upright_image_get_the_same_scores(phone_photo, upright, clip, clip_path):
    from transformers import CLIPImageProcessor

    model = get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES, num_text_tokens=2)).eval()
    processor = CLIPImageProcessor.from_pretrained(clip_path)
    buffer = io.BytesIO()
    upright.save(buffer, format="PNG")
    by_path, by_image = predict(model, [phone_photo, Image.open(buffer)], top_k=5, processor=processor)
    sideways = predict(model, [upright.transpose(Image.Transpose.ROTATE_90)], top_k=5, processor=processor)[0]
    assert by_path.labels == by_image.labels
    assert by_path.scores == pytest.approx(by_image.scores, abs=2e-3)
    assert by_path.scores != pytest.approx(sideways.scores, abs=1e-6) or by_path.labels != sideways.labels
