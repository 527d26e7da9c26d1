"""Validation during training (few-shot val split, best epoch, curve, trackers) and the launcher's settings."""

from __future__ import annotations

import importlib.util
import json
import logging

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file

import dpt_peft.model as model_module
from dpt_peft.cli import train_main

SHORT = ["--epochs", "3", "--shots", "4", "--report_to", "none", "--eval_batch_size", "300"]


def test_validation_every_epoch_keeps_the_best_adapter(tmp_path, monkeypatch):
    calls = []
    original = model_module.DPTModel.zero_shot_image_features

    def counted(self, pixel_values):
        calls.append(len(pixel_values))
        return original(self, pixel_values)

    monkeypatch.setattr(model_module.DPTModel, "zero_shot_image_features", counted)
    metrics = train_main([*SHORT, "--output_dir", str(tmp_path), "--eval_every", "1", "--save_best"])
    history = json.loads((tmp_path / "history.json").read_text())
    assert all(0 <= h["val_accuracy"] <= 1 for h in history)
    best = max(range(3), key=lambda e: (history[e]["val_accuracy"], -e))
    assert metrics["best_epoch"] == best and metrics["best_val_accuracy"] == pytest.approx(
        history[best]["val_accuracy"]
    )
    assert (tmp_path / "best_adapter" / "adapter_model.safetensors").exists()
    assert metrics["num_images"] == 600  # the test split is untouched by validation
    # Validation images: 4 per class x 5 classes = 20, so 20 frozen features for the first validation and none later.
    # (Training batches: 20 images per epoch; the final test: 600.)
    assert sum(calls) == 3 * 20 + 20 + 600


def test_save_best_needs_validation():
    with pytest.raises(ValueError, match="--save_best needs validation: pass --eval_every"):
        train_main([*SHORT, "--save_best"])


def test_the_launchers_precision_is_used_unless_a_flag_is_given(tmp_path, monkeypatch, fresh_accelerate_state):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    metrics = train_main([*SHORT, "--epochs", "1", "--output_dir", str(tmp_path / "launcher")])
    assert metrics["mixed_precision"] == "bf16"
    AcceleratorState._reset_state(reset_partial_state=True)
    metrics = train_main([*SHORT, "--epochs", "1", "--output_dir", str(tmp_path / "flag"), "--mixed_precision", "no"])
    assert metrics["mixed_precision"] == "no"


def test_default_logs_are_quiet_and_verbose_shows_each_epoch(tmp_path, caplog):
    with caplog.at_level("INFO"):
        train_main([*SHORT, "--epochs", "2", "--output_dir", str(tmp_path / "quiet")])
        assert not [r for r in caplog.records if r.levelname == "INFO" and r.name.startswith("dpt_peft")]
        train_main([*SHORT, "--epochs", "2", "--output_dir", str(tmp_path / "verbose"), "--verbose"])
        epochs = [r for r in caplog.records if r.name == "dpt_peft.training.trainer" and r.levelname == "INFO"]
    assert len(epochs) == 2


def test_decoded_cache_pipeline_trains_deterministically_and_reuses_the_cache(tmp_path, monkeypatch):
    """The training set decoded once (content-keyed files), augmentation on the device; twice the same adapter."""
    monkeypatch.setenv("DPT_PEFT_CACHE", str(tmp_path / "cache"))
    flags = [*SHORT, "--input_pipeline", "decoded_cache", "--augment", "true"]
    first = train_main([*flags, "--output_dir", str(tmp_path / "a")])
    cached = sorted((tmp_path / "cache").rglob("*.u8"))
    assert first["input_pipeline"] == "decoded_cache" and len(cached) == 4 * 5
    second = train_main([*flags, "--output_dir", str(tmp_path / "b")])
    assert sorted((tmp_path / "cache").rglob("*.u8")) == cached  # reused, nothing decoded again
    assert second["accuracy"] == pytest.approx(first["accuracy"])
    a, b = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_decoding_workers_count_each_unreadable_test_image_once(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 4)):
        for name in ("left", "right"):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "data" / "test" / "left" / "0.png").write_bytes(b"broken")
    metrics = train_main(
        [
            *SHORT,
            "--dataset",
            str(tmp_path / "data"),
            "--shots",
            "2",
            "--dataloader_num_workers",
            "2",
            "--num_text_tokens",
            "4",
            "--eval_every",
            "1",
            "--output_dir",
            str(tmp_path / "run"),
        ]
    )
    assert metrics["skipped_images"] == 1 and metrics["num_images"] == 7


def test_a_tracker_that_is_not_installed_is_named_once(tmp_path, caplog, fresh_accelerate_state):
    """Issue 32 item 11: Accelerate drops an unavailable tracker quietly; the run says so."""
    pytest.importorskip("tensorboard")
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    from dpt_peft.training.arguments import TrainArguments
    from dpt_peft.training.setup import make_accelerator

    args = TrainArguments(report_to=["tensorboard,wandb"], output_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="dpt_peft"):
        accelerator = make_accelerator(args)
    assert [str(getattr(t, "value", t)) for t in accelerator.log_with] == ["tensorboard"]
    assert caplog.text.count("--report_to wandb: its package is not installed") == 1


def test_each_base_model_has_its_own_default_run_folder():
    """Issue 32 item 12: README's toy CLIP and toy SigLIP commands run one after the other."""
    from dpt_peft.training.arguments import TrainArguments

    assert TrainArguments().output_dir == "outputs/dpt-toy"
    assert TrainArguments(model_name_or_path="dpt-peft/toy-siglip").output_dir == "outputs/dpt-toy-siglip"
    assert TrainArguments(model_name_or_path="openai/clip-vit-base-patch16").output_dir == (
        "outputs/dpt-clip-vit-base-patch16"
    )
    assert TrainArguments(output_dir="mine").output_dir == "mine"
    assert TrainArguments(method="lora").output_dir == "outputs/lora-toy"  # another kind of adapter, its own folder
    assert TrainArguments(method="linear_probe").output_dir == "outputs/linear-probe-toy"
    assert TrainArguments(method="coop").output_dir == "outputs/dpt-toy"


def test_a_learning_rate_beyond_float32_is_refused_before_the_run():
    """Issue 31: `--text_lr 1e300` died in the optimizer with "value cannot be converted to type float"."""
    from dpt_peft.training.arguments import TrainArguments
    from dpt_peft.utils.errors import UserInputError

    with pytest.raises(UserInputError, match=r"--text_lr 1e\+300 does not fit a float32 .*diverge"):
        TrainArguments(text_lr=1e300)


def test_a_precision_the_device_cannot_give_is_said_once(tmp_path, caplog, fresh_accelerate_state):
    """Issue 32 item 11: fp16 asked on a CPU is recorded as "no"; the run says so instead of staying silent."""
    from dpt_peft.training.arguments import TrainArguments
    from dpt_peft.training.setup import make_accelerator

    if torch.cuda.is_available():
        pytest.skip("fp16 is available on this machine's GPU")
    with caplog.at_level(logging.WARNING, logger="dpt_peft"):
        make_accelerator(TrainArguments(mixed_precision="fp16", output_dir=str(tmp_path)))
    assert caplog.text.count("--mixed_precision fp16 is not available on cpu; this run uses no") == 1
