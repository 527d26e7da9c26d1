"""The training loop end to end on the toy task (short runs), resume, metrics, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch
from helpers import killed_after_epoch
from PIL import Image
from safetensors.torch import load_file

from dpt_peft.cli import evaluate_main, parse_args, train_main
from dpt_peft.metrics import ACCURACY_PATH
from dpt_peft.toy.shapes import POSITIONS
from dpt_peft.training.recipe import recipe_lr_factor

REPO = Path(__file__).resolve().parents[2]
SHORT = ["--epochs", "3", "--shots", "4", "--report_to", "none", "--eval_batch_size", "300"]


def run(output_dir, *extra: str) -> dict:
    return train_main([*SHORT, "--output_dir", str(output_dir), *extra])


def adapter_tensors(output_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(output_dir) / "adapter" / "adapter_model.safetensors")


def test_toy_run_writes_adapter_metrics_curve_and_logs(tmp_path):
    metrics = run(tmp_path, "--report_to", "tensorboard")
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == metrics
    for key in (
        "zero_shot_accuracy",
        "accuracy",
        "mean_per_class_accuracy",
        "trainable_parameters",
        "wall_time_s",
        "train_images_per_s",
    ):
        assert key in written
    assert 0.2 < written["zero_shot_accuracy"] < 1 and 0 <= written["accuracy"] <= 1
    assert written["num_train_images"] == 4 * len(POSITIONS) and written["num_images"] == 600
    assert written["steps"] == 3 and written["epochs"] == 3
    assert sorted(written["per_class_accuracy"]) == sorted(POSITIONS)
    assert (tmp_path / "training_curve.png").stat().st_size > 1000
    assert list((tmp_path / "dpt_peft").rglob("events.out.tfevents.*"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["guidance"] for h in history] == [True, False, False]  # half of 3 epochs, rounded down

    report = evaluate_main(["--adapter", str(tmp_path / "adapter"), "--output_dir", str(tmp_path / "eval")])
    assert report["accuracy"] == pytest.approx(written["accuracy"])  # the saved adapter gives the same predictions
    assert (tmp_path / "eval" / "per_class_accuracy.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="trained on 2 of the 'new' classes.*--subsample_classes base"):
        evaluate_main(["--adapter", str(tmp_path / "adapter"), "--output_dir", str(tmp_path / "b2n"), "--base_to_new"])


def test_base_to_new_evaluates_a_base_adapter_on_unseen_classes(tmp_path):
    metrics = run(tmp_path / "base", "--subsample_classes", "base")
    assert sorted(metrics["per_class_accuracy"]) == ["left", "right", "top"]  # CoCoOp: first half, rounded up
    new_only = run(tmp_path / "new", "--subsample_classes", "new", "--epochs", "1")
    assert sorted(new_only["per_class_accuracy"]) == ["bottom", "center"]  # relabelled from 0
    out = tmp_path / "eval"
    report = evaluate_main(["--adapter", str(tmp_path / "base" / "adapter"), "--output_dir", str(out), "--base_to_new"])
    written = json.loads((out / "eval_metrics.json").read_text())["base_to_new"]
    assert written == report["base_to_new"]
    assert written["new_classes"] == ["bottom", "center"] and written["base_classes"] == ["left", "right", "top"]
    assert written["harmonic_mean"] == pytest.approx(
        2 * written["base_accuracy"] * written["new_accuracy"] / (written["base_accuracy"] + written["new_accuracy"])
    )


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    run(tmp_path / "straight")
    with killed_after_epoch(1):
        run(tmp_path / "resumed")
    checkpoints = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert checkpoints == ["epoch_0", "epoch_1"]  # complete checkpoints only, no .partial left
    run(tmp_path / "resumed", "--resume_from_checkpoint", "latest")
    straight, resumed = adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "resumed" / "history.json").read_text()) == json.loads(
        (tmp_path / "straight" / "history.json").read_text()
    )


def test_checkpoints_hold_the_adapter_not_the_clip(tmp_path):
    run(tmp_path)
    checkpoint = tmp_path / "checkpoints" / "epoch_2"
    assert (checkpoint / "adapter" / "adapter_model.safetensors").exists()
    assert not list(checkpoint.glob("model*.safetensors")) and not list(checkpoint.glob("pytorch_model*"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_1", "epoch_2"]


def test_resume_with_another_config_is_refused(tmp_path):
    run(tmp_path)
    with pytest.raises(ValueError, match="made with another config .*text_lr: 0.002 -> 0.01"):
        run(tmp_path, "--resume_from_checkpoint", "latest", "--text_lr", "0.01")
    with pytest.raises(ValueError, match="no checkpoint in"):
        run(tmp_path / "empty", "--resume_from_checkpoint", "latest")


def test_output_dir_with_a_different_run_is_refused(tmp_path):
    run(tmp_path)
    with pytest.raises(ValueError, match="already holds this run.*--resume_from_checkpoint latest"):
        run(tmp_path)  # the same run again is refused too: it would replace the finished one
    with pytest.raises(ValueError, match=r"holds a different run \(dpt_config.*--overwrite_output_dir"):
        run(tmp_path, "--num_visual_tokens", "3")
    run(tmp_path, "--num_visual_tokens", "3", "--overwrite_output_dir")
    assert json.loads((tmp_path / "run.json").read_text())["dpt_config"]["num_visual_tokens"] == 3
    other = tmp_path / "not_a_run"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no dpt_peft run"):
        run(other)


def test_flags_cover_the_config_and_the_toy_defaults():
    args, overrides = parse_args(["--method", "vpt", "--class_aware_layer", "2", "--class_specific_context"])
    assert args.method == "vpt" and overrides == {
        "num_text_tokens": 4,
        "class_aware_layer": 2,
        "class_specific_context": True,
    }
    assert args.augment is False  # a flip would turn "left" into "right"
    args, overrides = parse_args(["--dataset", "some/hub-dataset", "--augment", "true"])
    assert args.augment is True and overrides == {"num_text_tokens": 4}  # the toy CLIP's 16 positions, any data
    args, overrides = parse_args(
        ["--dataset", "some/hub-dataset", "--model_name_or_path", "openai/clip-vit-base-patch16"]
    )
    assert overrides == {}
    assert args.resolved_guidance_epochs == 30 and args.visual_lr == 0.01 and args.text_lr == 0.002
    assert args.resolved_visual_warmup_epochs == 10


def test_lr_schedule_is_constant_warmup_then_cosine():
    factor = recipe_lr_factor(0.01, warmup_epochs=2, warmup_lr=1e-5, epochs=10, steps_per_epoch=3)
    assert [factor(s) for s in range(6)] == pytest.approx([1e-3] * 6)
    assert factor(6) == pytest.approx(1.0)  # Dassl's WARMUP_RECOUNT: the cosine starts at 0 after the warm-up
    assert factor(29) == pytest.approx(0.5 * (1 + np.cos(np.pi * 7 / 10)))


def test_offline_metric_module():
    metric = evaluate.load(ACCURACY_PATH)
    result = metric.compute(predictions=[0, 1, 1, 2, 2, 2], references=[0, 1, 2, 2, 2, 0], num_classes=4)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["per_class_accuracy"] == [0.5, 1.0, pytest.approx(2 / 3), None]
    assert result["mean_per_class_accuracy"] == pytest.approx((0.5 + 1 + 2 / 3) / 3)


def make_image_folder(root: Path, per_class: int = 5, corrupt: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for name in ("left", "right", "top"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    if corrupt:
        (root / "left" / "broken.png").write_bytes(b"not a png at all")
    return root


def test_image_folder_with_a_corrupt_image_is_trained_and_counted(tmp_path):
    folder = make_image_folder(tmp_path / "images", corrupt=True)
    metrics = run(tmp_path / "out", "--dataset", str(folder), "--shots", "2", "--num_text_tokens", "4")
    assert metrics["skipped_images"] == 1
    assert metrics["num_train_images"] + metrics["num_images"] + metrics["skipped_images"] == 16


@pytest.mark.parametrize(
    "extra, error, message",
    [
        (["--dataset", "./no/such/folder"], FileNotFoundError, "--dataset './no/such/folder' does not exist"),
        (["--image_column", "picture"], ValueError, r"no column 'picture'.*\['image', 'label'\].*--image_column"),
        (["--label_column", "y"], ValueError, "no column 'y'.*--label_column"),
        (["--shots", "40"], ValueError, "Class 'left' has 32 images, fewer than --shots 40"),
        (["--train_split", "validation"], ValueError, "no split 'validation'.*--train_split"),
    ],
)
def test_bad_training_input(tmp_path, extra, error, message):
    with pytest.raises(error, match=message):
        run(tmp_path, *extra)
    assert not (tmp_path / "run.json").exists()  # failed before any work


def test_labels_outside_the_class_names(tmp_path):
    folder = make_image_folder(tmp_path / "images")
    names = tmp_path / "names.txt"
    names.write_text("left\nright\n")
    with pytest.raises(ValueError, match=r"Label 2 in column 'label' is outside the 2 class names \(0..1\)"):
        run(
            tmp_path / "out",
            "--dataset",
            str(folder),
            "--class_names_file",
            str(names),
            "--shots",
            "2",
            "--num_text_tokens",
            "4",
        )


@pytest.mark.slow
def test_two_cpu_processes_with_torchrun(tmp_path):
    """DDP over two CPU processes (Accelerate needs MPI for `accelerate launch --cpu`, so torchrun starts them)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(REPO / "examples" / "train.py"),
        *SHORT,
        "--output_dir",
        str(tmp_path),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_images"] == 600  # gathered once across processes, no duplicates
    assert metrics["steps"] == 3  # 20 images: one batch of 32 per epoch, split over 2 processes
    assert completed.stdout.count("zero-shot accuracy") == 1  # printed by the main process only


@pytest.mark.slow
def test_accelerate_launch_single_process(tmp_path):
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO / "examples" / "train.py"),
        *SHORT,
        "--output_dir",
        str(tmp_path),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads((tmp_path / "metrics.json").read_text())["num_images"] == 600


def test_bf16_mixed_precision_run(tmp_path, fresh_accelerate_state):
    fp32 = run(tmp_path / "fp32")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    bf16 = run(tmp_path / "bf16", "--mixed_precision", "bf16")
    assert abs(bf16["zero_shot_accuracy"] - fp32["zero_shot_accuracy"]) < 0.03
    assert 0.2 < bf16["accuracy"] <= 1.0


def test_push_to_hub_after_training(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from huggingface_hub import HfApi

    from dpt_peft.training import trainer

    uploaded = {}
    monkeypatch.setattr(trainer, "get_token", lambda: "hf_test")  # --push_to_hub is checked for a token first
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(
        HfApi,
        "create_commit",
        lambda self, repo_id, operations, **kw: uploaded.update(
            {repo_id: sorted(op.path_in_repo for op in operations)}
        ),
    )
    run(tmp_path, "--push_to_hub", "--hub_model_id", "someone/dpt-toy")
    assert uploaded == {"someone/dpt-toy": ["README.md", "adapter_config.json", "adapter_model.safetensors"]}
    run(tmp_path / "dpt-other", "--push_to_hub")  # no --hub_model_id: the output folder's name, as Trainer does
    assert set(uploaded) == {"someone/dpt-toy", "dpt-other"}


def test_a_hub_dataset_name_goes_through_load_dataset(tmp_path, monkeypatch):
    """The download is faked; everything after `load_dataset` (checks, few-shot split, training) runs for real."""
    import dpt_peft.data.datasets as data_module
    from dpt_peft.toy.tasks import toy_dataset

    requested = []
    monkeypatch.setattr(data_module, "load_dataset", lambda name: requested.append(name) or toy_dataset("size"))
    metrics = run(tmp_path, "--dataset", "someone/shapes", "--num_text_tokens", "4", "--augment", "false")
    assert requested == ["someone/shapes"]
    assert sorted(metrics["per_class_accuracy"]) == ["large", "small"]


def test_the_paper_recipe_is_one_value_for_the_loop_and_the_hf_trainer():
    from dpt_peft.training.arguments import TrainArguments
    from dpt_peft.training.recipe import Recipe

    assert TrainArguments(dataset="some/hub-dataset").recipe == Recipe.for_method("dpt") == Recipe()
    assert TrainArguments(dataset="some/hub-dataset", method="coop", epochs=10).recipe.guidance_epochs == 0
    assert Recipe.for_method("vpt_coop", epochs=10).guidance(4) and not Recipe.for_method("vpt_coop", 10).guidance(5)


def test_a_run_state_reads_back_as_checkpoints_store_it():
    from dpt_peft.training.run_state import RunState

    state = RunState(epochs_done=3, global_step=12, history=[{"epoch": 2}], train_seconds=1.5, train_images=96)
    stored = state.to_dict()
    assert stored["epoch"] == 2 and "epochs_done" not in stored
    assert RunState.from_dict(stored) == state
    older = {"epoch": 0, "global_step": 4, "history": [], "train_seconds": 0.5}  # before train_images existed
    assert RunState.from_dict(older) == RunState(epochs_done=1, global_step=4, train_seconds=0.5)


def test_no_library_module_imports_the_command_line():
    """The CLI is a leaf: no module imports it, also not inside a function (only `python -m dpt_peft` runs it)."""
    import ast

    root = Path(__file__).parents[2]
    offenders = []
    for path in (root / "dpt_peft").rglob("*.py"):
        if path.name == "__main__.py" or path.relative_to(root).parts[1] == "cli":  # the CLI package itself
            continue
        package = ".".join(path.relative_to(root).parent.parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported = {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.level else node.module
                module = module if node.module or not node.level else base
                imported = {module} | {f"{module}.{alias.name}" for alias in node.names}
            else:
                continue
            if "dpt_peft.cli" in imported:
                offenders.append(str(path.relative_to(root)))
    assert not offenders
