"""The data fingerprint a run records (issue 31): what the training files hold, not where or when they were copied."""

from __future__ import annotations

import os
import shutil
import time

from PIL import Image

from dpt_peft.data.datasets import FewShotData, load_image_dataset
from dpt_peft.data.few_shot import data_fingerprint


def fingerprint(folder) -> str:
    data = load_image_dataset(str(folder))["train"]
    return data_fingerprint({"main": FewShotData(train=data, test=data, class_names=["cat", "dog"])}, "image", "label")


def test_a_byte_identical_copy_is_the_same_data_and_a_changed_file_is_not(tmp_path, monkeypatch):
    monkeypatch.setenv("DPT_PEFT_CACHE", str(tmp_path / "cache"))
    for name, colour in (("cat", "red"), ("dog", "blue")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), colour).save(tmp_path / "data" / name / f"{i}.png")
    original = fingerprint(tmp_path / "data")
    time.sleep(0.01)
    shutil.copytree(tmp_path / "data", tmp_path / "copy")  # `cp -r`: new mtimes and inodes, the same bytes
    assert fingerprint(tmp_path / "copy") == original
    os.utime(tmp_path / "data" / "cat" / "0.png")  # touched, not changed
    assert fingerprint(tmp_path / "data") == original
    Image.new("RGB", (8, 8), "green").save(tmp_path / "copy" / "cat" / "0.png")
    assert fingerprint(tmp_path / "copy") != original
