"""Issue 31: inputs that could smuggle work or hang (docs/reliability.md sections 7, 9, 10): only regular files are read
as images, the image cache's notes are keyed by every decoder setting, `data check` refuses split files that point
outside the dataset, resume compares paths and not their spelling, and a missing manifest is named in the refusal."""

from __future__ import annotations

import io
import json
import os
import threading
import time

import numpy as np
import pytest
from coop_layouts import SPLIT_FILES, make_layout
from datasets import Dataset, Image
from PIL import Image as PILImage
from PIL import ImageFile

from dpt_peft.data.check import check_data
from dpt_peft.data.decoded_cache import DecodedImageCache, decoder_settings
from dpt_peft.data.images import open_rgb
from dpt_peft.training.run_dir import check_output_dir, first_difference
from dpt_peft.utils.write_policy import MANIFEST_FILE, OutputFolder


def _dataset(paths: list[str]) -> Dataset:
    return Dataset.from_dict({"image": paths, "label": [0] * len(paths)}).cast_column("image", Image(decode=False))


def test_a_fifo_named_like_an_image_is_unreadable_at_once_never_read_forever(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    good = tmp_path / "good.png"
    PILImage.new("RGB", (8, 8), "red").save(good)
    outcome = {}

    def read():
        try:
            open_rgb(fifo)
        except OSError as err:
            outcome["error"] = str(err)
        outcome["cache"] = DecodedImageCache.build(_dataset([str(good), str(fifo)]), "image", 16)

    reader = threading.Thread(target=read, daemon=True)  # a regression hangs this thread, not the suite
    started = time.monotonic()
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive(), f"reading a FIFO blocked for {time.monotonic() - started:.0f} s"
    assert "pipe.png is not a regular file" in outcome["error"]
    assert outcome["cache"].skipped == [str(fifo)] and len(outcome["cache"]) == 1  # skipped and counted


def test_an_unreadable_note_is_keyed_by_pillows_settings_so_a_truncated_jpeg_is_retried(tmp_path, monkeypatch):
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    PILImage.fromarray(noise).save(buffer, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])  # a download cut short
    dataset = _dataset([str(truncated)])
    cache = tmp_path / "cache"
    strict = decoder_settings()
    assert DecodedImageCache.build(dataset, "image", 16, cache_dir=cache).skipped == [str(truncated)]
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # the user's Pillow setting
    assert decoder_settings() != strict
    again = DecodedImageCache.build(dataset, "image", 16, cache_dir=cache)
    assert again.skipped == [] and len(again) == 1  # the note of the strict decoder does not apply


@pytest.mark.parametrize("listed", ["../" * 40 + "etc/passwd", "/etc/passwd"], ids=["dot_dot", "absolute"])
def test_data_check_refuses_a_split_file_that_points_outside_the_dataset(tmp_path, listed):
    make_layout(tmp_path, "dtd")
    split_path = next(tmp_path.rglob(SPLIT_FILES["dtd"]))
    split = json.loads(split_path.read_text())
    split["test"][0][0] = listed
    split_path.write_text(json.dumps(split))
    (check,) = check_data(tmp_path, ["dtd"], skip_missing_images=True)
    assert not check.ok
    assert any(
        "test split lists 1 image(s) outside" in p and "never absolute or with `..`" in p for p in check.problems
    )


def test_resume_compares_paths_not_their_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgf").mkdir()
    (tmp_path / "other").mkdir()
    for spelling in ("./imgf", "imgf/", str(tmp_path / "imgf"), "./imgf/../imgf"):
        assert first_difference({"dataset": "imgf", "epochs": 1}, {"dataset": spelling, "epochs": 1}) is None
    assert first_difference({"dataset": "imgf"}, {"dataset": "other"}) == "dataset: 'imgf' -> 'other'"
    assert first_difference({"method": "./dpt"}, {"method": "dpt"}) is not None  # only path arguments


@pytest.mark.parametrize(("damage", "named"), [("remove", "is missing"), ("truncate", "is truncated or corrupt")])
def test_a_removed_or_damaged_manifest_is_named_in_the_refusal(tmp_path, damage, named):
    folder = OutputFolder(tmp_path / "run")
    folder.write_json("run.json", {"epochs": 1})
    folder.write_json("metrics.json", {})
    if damage == "remove":
        folder.manifest_path.unlink()
    else:
        folder.manifest_path.write_text('{"format": "dpt_peft-wri')
    pattern = rf"{MANIFEST_FILE} \(the manifest of what dpt_peft wrote\) {named}"
    with pytest.raises(ValueError, match=pattern + (r".*cp -r run/\*" if damage == "remove" else "")):
        check_output_dir(tmp_path / "run", {"epochs": 1}, resume=True, overwrite=False)
    with pytest.raises(ValueError, match=pattern):
        folder.check(["metrics.json"], "--overwrite_reports")
