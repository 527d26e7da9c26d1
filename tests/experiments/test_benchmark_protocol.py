"""The paper's protocol: the reference recipe exactly, and the CoOp benchmark datasets through the real CLIs."""

from __future__ import annotations

import json
import math

import pytest
from coop_layouts import make_layout
from helpers import CLASS_NAMES
from peft import get_peft_model

from dpt_peft import DPTConfig
from dpt_peft.cli import evaluate_main, parse_args, train_main
from dpt_peft.training.recipe import build_optimizer, build_scheduler

SHORT = ["--epochs", "2", "--report_to", "none", "--eval_batch_size", "64", "--batch_size", "4"]


def group_lrs(clip, method: str, epochs_to_read: list[int], argv: list[str] = ()) -> dict[str, list[float]]:
    """Each optimizer group's learning rate during the given epochs (2 steps per epoch)."""
    args, _ = parse_args(["--method", method, "--dataset", "some/hub-dataset", *argv])
    model = get_peft_model(clip, DPTConfig.for_method(method, class_names=CLASS_NAMES))
    optimizer = build_optimizer(model, args.recipe)
    scheduler = build_scheduler(optimizer, args.recipe, steps_per_epoch=2)
    lrs: dict[str, list[float]] = {group["name"]: [] for group in optimizer.param_groups}
    for step in range(2 * args.epochs):
        if step % 2 == 0 and step // 2 in epochs_to_read:
            for group in optimizer.param_groups:
                lrs[group["name"]].append(group["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_both_groups_follow_dassl_warmup_then_restarted_cosine(clip):
    lrs = group_lrs(clip, "dpt", [0, 9, 10, 30, 59])
    assert lrs["visual"] == pytest.approx([1e-5, 1e-5, 0.01, 0.0075, 8.07e-4], rel=1e-3)
    text = [0.002 * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / 60)) for epoch in (9, 10, 30, 59)]
    assert lrs["text"] == pytest.approx([1e-5, *text], rel=1e-6)  # 1 warm-up epoch, then the restarted cosine


def test_imagenet_warms_the_visual_group_up_for_one_epoch(tmp_path):
    args, overrides = parse_args(["--dataset", "imagenet", "--data_root", str(tmp_path)])
    assert args.resolved_visual_warmup_epochs == 1 and args.text_warmup_epochs == 1
    assert overrides["zero_shot_template"] == "a photo of a {}."
    args, _ = parse_args(["--dataset", "imagenet", "--data_root", str(tmp_path), "--visual_warmup_epochs", "3"])
    assert args.resolved_visual_warmup_epochs == 3


@pytest.mark.parametrize(
    ("dataset", "template"),
    [
        ("oxford_pets", "a photo of a {}, a type of pet."),
        ("eurosat", "a centered satellite photo of {}."),
        ("dtd", "{} texture."),
        ("ucf101", "a photo of a person doing {}."),
    ],
)
def test_zero_shot_template_is_chosen_per_dataset(tmp_path, dataset, template):
    _, overrides = parse_args(["--dataset", dataset, "--data_root", str(tmp_path)])
    assert overrides["zero_shot_template"] == template
    _, overrides = parse_args(["--dataset", dataset, "--data_root", str(tmp_path), "--zero_shot_template", "{}"])
    assert overrides["zero_shot_template"] == "{}"  # an explicit flag wins


def test_coop_and_vpt_train_with_plain_cross_entropy():
    for method, guided in (("coop", 0), ("vpt", 0), ("vpt_coop", 30), ("dpt", 30)):
        args, _ = parse_args(["--method", method, "--dataset", "some/hub-dataset"])
        assert args.resolved_guidance_epochs == guided, method
    args, _ = parse_args(["--method", "coop", "--dataset", "some/hub-dataset", "--guidance_epochs", "5"])
    assert args.resolved_guidance_epochs == 5


def test_the_last_partial_batch_is_dropped(tmp_path):
    """8 shots x 5 classes = 40 images at batch 32: one step per epoch, as Dassl's drop_last (not two)."""
    metrics = train_main(["--shots", "8", "--epochs", "2", "--report_to", "none", "--output_dir", str(tmp_path)])
    assert metrics["steps"] == 2


def test_a_benchmark_dataset_needs_its_data_root():
    with pytest.raises(ValueError, match="--data_root.*oxford_pets/.*DATASETS.md"):
        parse_args(["--dataset", "oxford_pets"])


def test_train_and_evaluate_on_a_coop_layout_with_saved_and_reused_splits(tmp_path):
    shapes = [(name.capitalize(), name) for name in ("circle", "square", "triangle", "cross", "ring")]  # toy words
    make_layout(tmp_path / "data", "oxford_pets", counts={"train": 3, "val": 2, "test": 2}, classes=shapes)
    toy = ["--num_text_tokens", "4", "--zero_shot_template", "a photo of a {}."]  # the toy CLIP has 16 positions
    data = ["--dataset", "oxford_pets", "--data_root", str(tmp_path / "data"), *toy]
    first = train_main([*data, *SHORT, "--shots", "2", "--output_dir", str(tmp_path / "first")])
    split = json.loads((tmp_path / "first" / "splits" / "oxford_pets.json").read_text())
    assert split["provenance"] == {"dataset": "oxford_pets", "shots": 2, "seed": 1}  # CoOp's first seed by default
    assert len(split["splits"]["train"]) == 2 * 5 and len(split["splits"]["val"]) == 2 * 5  # min(K, 4) from val
    assert first["num_train_images"] == 10 and first["num_images"] == 10

    # The same split on "another machine": the data moved, the JSON reused, another seed ignored for sampling.
    (tmp_path / "data").rename(tmp_path / "moved")
    moved = ["--dataset", "oxford_pets", "--data_root", str(tmp_path / "moved"), *toy]
    split_file = str(tmp_path / "first" / "splits" / "oxford_pets.json")
    again = train_main(
        [
            *moved,
            *SHORT,
            "--shots",
            "2",
            "--seed",
            "7",
            "--split_file",
            split_file,
            "--output_dir",
            str(tmp_path / "again"),
        ]
    )
    reused = json.loads((tmp_path / "again" / "splits" / "oxford_pets.json").read_text())
    assert reused["splits"] == split["splits"] and again["num_train_images"] == 10

    base = train_main(
        [*moved, *SHORT, "--shots", "2", "--subsample_classes", "base", "--output_dir", str(tmp_path / "base")]
    )
    assert len(base["per_class_accuracy"]) == 3
    report = evaluate_main(
        [
            "--adapter",
            str(tmp_path / "base" / "adapter"),
            *moved[:4],
            "--base_to_new",
            "--output_dir",
            str(tmp_path / "eval"),
        ]
    )
    assert len(report["base_to_new"]["new_classes"]) == 2 and report["num_images"] == 10
    assert 0 <= report["base_to_new"]["harmonic_mean"] <= 1
