"""`train --method lora` on the toy (short runs): CLIP-LoRA's iteration stream and schedule, the run's files,
evaluate / predict / base-to-new on the saved adapter, resume, and the flags refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import killed_after_epoch
from safetensors.torch import load_file

from dpt_peft.cli import evaluate_main, parse_args, predict_main, train_main
from dpt_peft.toy.shapes import POSITIONS
from dpt_peft.toy.tasks import toy_dataset
from dpt_peft.training.lora_schedule import IterationBatches
from dpt_peft.training.recipe import LoraRecipe

# 4 shots x 10 iterations = 40 iterations of 32 images, in 4 epochs of 10 (one checkpoint each).
SHORT = ["--method", "lora", "--shots", "4", "--iterations_per_shot", "10", "--report_to", "none"]
SHORT += ["--eval_batch_size", "300", "--checkpoints_to_keep", "4"]


def run(output_dir, *extra: str) -> dict:
    return train_main([*SHORT, "--output_dir", str(output_dir), *extra])


def adapter_tensors(output_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(output_dir) / "adapter" / "adapter_model.safetensors")


def test_iteration_stream_is_clip_loras_passes_cut_into_epochs():
    epoch = {"value": 0}
    batches = IterationBatches(80, 32, iterations_per_epoch=5, seed=1, epoch=lambda: epoch["value"])
    stream = []
    for epoch["value"] in range(3):
        stream += list(batches)
    assert len(batches) == 5 and len(stream) == 15
    assert [len(b) for b in stream[:6]] == [32, 32, 16, 32, 32, 16]  # each pass keeps its short last batch
    for pass_index in range(5):  # 15 batches = 5 passes of 3, each a permutation of the 80 images
        rows = [i for batch in stream[3 * pass_index : 3 * pass_index + 3] for i in batch]
        assert sorted(row - pass_index * 80 for row in rows) == list(range(80))
    assert stream[0] != [row - 80 for row in stream[3]]  # every pass draws its own order


def test_lora_run_trains_clip_loras_schedule_and_its_adapter_evaluates_and_predicts(tmp_path):
    metrics = run(tmp_path / "run")
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written == metrics and metrics["method"] == "lora"
    assert metrics["steps"] == 40 and metrics["epochs"] == 4
    assert metrics["num_train_images"] == 4 * len(POSITIONS) and metrics["num_images"] == 600
    assert metrics["trainable_parameters"] == 5376  # rank 2 on q, k, v of 3 text and 4 vision layers of width 64
    assert 0.2 < metrics["zero_shot_accuracy"] < 1 and 0 <= metrics["accuracy"] <= 1
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["step"] for h in history] == [10, 20, 30, 40] and not any(h["guidance"] for h in history)
    recipe = LoraRecipe()  # CosineAnnealingLR(40, eta_min=1e-6), stepped per iteration
    lr = [
        recipe.eta_min + (recipe.lr - recipe.eta_min) * (1 + torch.cos(torch.tensor(torch.pi * s / 40))) / 2
        for s in (10, 20, 30, 40)
    ]
    assert [h["lr"][0] for h in history] == pytest.approx([float(v) for v in lr], rel=1e-5)
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_json["lora_r"] == 2 and run_json["lora_lr"] == 2e-4 and "dpt_config" not in run_json

    adapter = tmp_path / "run" / "adapter"
    report = evaluate_main(["--adapter", str(adapter), "--output_dir", str(tmp_path / "eval")])
    assert report["accuracy"] == pytest.approx(metrics["accuracy"])
    assert report["zero_shot_accuracy"] == pytest.approx(metrics["zero_shot_accuracy"])
    assert report["zero_shot_template"] == "a photo of a {}."

    images = tmp_path / "images"
    images.mkdir()
    for index, row in enumerate(toy_dataset("position")["test"].select(range(3))):
        row["image"].save(images / f"{index}.png")
    rows = predict_main(["--adapter", str(adapter), str(images), "--output", str(tmp_path / "predictions.jsonl")])
    assert len(rows) == 3 and all(row["labels"][0] in POSITIONS for row in rows)
    assert all(sum(row["probabilities"]) <= 1 + 1e-6 for row in rows)


def test_lora_adapter_of_base_classes_scores_new_classes(tmp_path):
    run(tmp_path / "run", "--subsample_classes", "base")
    report = evaluate_main(
        ["--adapter", str(tmp_path / "run" / "adapter"), "--output_dir", str(tmp_path / "eval"), "--base_to_new"]
    )
    split = report["base_to_new"]
    assert len(split["base_classes"]) + len(split["new_classes"]) == len(POSITIONS)
    assert 0 <= split["new_accuracy"] <= 1 and 0 < split["harmonic_mean"] <= 1


def test_resumed_lora_run_equals_uninterrupted_run(tmp_path):
    run(tmp_path / "straight")
    with killed_after_epoch(1):
        run(tmp_path / "resumed")
    run(tmp_path / "resumed", "--resume_from_checkpoint", "latest")
    straight, resumed = adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "resumed")
    assert straight.keys() == resumed.keys() and any("lora_B" in key for key in straight)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6)
    history = [json.loads((tmp_path / name / "history.json").read_text()) for name in ("straight", "resumed")]
    assert history[0] == history[1]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lora_r", "0"], "--lora_r 0"),
        (["--lora_dropout", "-0.1"], "--lora_dropout -0.1"),
        (["--lora_targets", "q,x"], "--lora_targets"),
        (["--visual_lr", "0.1"], "--visual_lr is DPT's; --method lora uses --lora_lr"),
        (["--epochs", "7"], "--epochs 7 must divide the 40 iterations"),
        (["--tasks", "toy-position,toy-shape"], "one task"),
    ],
)
def test_bad_lora_flags_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_args([*SHORT, *flags])


def test_lora_flags_with_another_method_and_dpt_config_flags_with_lora_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--lora_r is a setting of --method lora"):
        parse_args(["--lora_r", "4"])
    with pytest.raises(ValueError, match="--num_visual_tokens is a DPTConfig setting"):
        run(tmp_path / "run", "--num_visual_tokens", "3")
    assert not (tmp_path / "run").exists()  # refused before the first write
    args, _ = parse_args(SHORT)
    assert args.epochs == 4 and args.recipe.iterations_per_epoch == 10  # --epochs: one part per shot
    assert args.recipe.learning_rate_flags() == "--lora_lr 0.0002"
