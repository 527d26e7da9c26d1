"""Round 2 of transformers habits: datasets objects, --load_best_model_at_end, TrainingArguments' flag names, config
files, Hub defaults, the toy CLIP on a user's folders, FSDP refused, what ran recorded, the pipeline saved."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import DatasetDict
from transformers import pipeline

from dpt_peft import AutoDPTModel, DPTConfig
from dpt_peft.cli import parse_args, train_main
from dpt_peft.sources import load_base_model
from dpt_peft.toy.tasks import toy_dataset
from dpt_peft.training.arguments import TrainArguments
from dpt_peft.training.trainer import train

SHORT = ["--epochs", "3", "--shots", "4", "--report_to", "none", "--eval_batch_size", "300"]


def test_trainingarguments_names_dash_aliases_and_a_report_to_list_parse_as_todays_flags():
    args, overrides = parse_args(
        ["--num_train_epochs", "2", "--per-device-train-batch-size", "4", "--save_total_limit", "3"]
        + ["--eval_strategy", "epoch", "--load_best_model_at_end", "--report_to", "tensorboard,wandb"]
        + ["--output-dir", "runs/x"]
    )
    assert (args.epochs, args.batch_size, args.checkpoints_to_keep, args.eval_every) == (2, 4, 3, 1)
    assert args.save_best and args.report_to == ["tensorboard", "wandb"] and args.output_dir == "runs/x"
    assert parse_args(["--report_to", "tensorboard", "wandb"])[0].report_to == ["tensorboard", "wandb"]
    assert overrides == {"num_text_tokens": 4}  # the toy CLIP's default


def test_a_yaml_or_json_file_is_the_sole_argument(tmp_path):
    (tmp_path / "run.yaml").write_text("num_train_epochs: 5\nshots: 2\nnum_text_tokens: 2\n")
    args, overrides = parse_args([str(tmp_path / "run.yaml")])
    assert (args.epochs, args.shots, overrides["num_text_tokens"]) == (5, 2, 2)
    (tmp_path / "run.json").write_text(json.dumps({"batch_size": 8, "no_such_flag": 1}))
    with pytest.raises(ValueError, match="unknown setting.*no_such_flag"):  # a UserInputError: one line, exit 2
        parse_args([str(tmp_path / "run.json")])


def test_the_toy_clip_defaults_apply_to_any_dataset_and_hub_id_defaults_to_the_folder():
    args = TrainArguments(dataset="some/hub-dataset", output_dir="runs/my-adapter", push_to_hub=True)
    assert args.config_overrides({}) == {"num_text_tokens": 4} and args.hub_repo_id == "my-adapter"
    assert TrainArguments(model_name_or_path="openai/clip-vit-base-patch16").config_overrides({}) == {}


def test_the_training_function_takes_a_dataset_dict_and_refuses_other_objects(tmp_path):
    with pytest.raises(TypeError, match="dataset=list: give a dataset name or folder"):
        TrainArguments(dataset=[1, 2])
    data = toy_dataset("shape")
    metrics = train(
        TrainArguments(dataset=DatasetDict(data), shots=2, epochs=1, report_to="none", output_dir=str(tmp_path)),
        {"num_text_tokens": 4},
    )
    assert metrics["num_images"] == len(data["test"]) and metrics["num_train_images"] == 2 * len(
        data["train"].features["label"].names
    )


def test_load_best_model_at_end_reports_the_best_epoch_and_keeps_the_last(tmp_path):
    metrics = train_main(
        [*SHORT, "--output_dir", str(tmp_path), "--eval_strategy", "epoch", "--load_best_model_at_end"]
    )
    history = json.loads((tmp_path / "history.json").read_text())
    best = max(range(3), key=lambda e: (history[e]["val_accuracy"], -e))
    assert metrics["adapter_epoch"] == metrics["best_epoch"] == best
    assert (tmp_path / "last_adapter").exists() == (best != 2)
    from safetensors.torch import load_file

    final = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    best_saved = load_file(tmp_path / "best_adapter" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], best_saved[k]) for k in final)


def test_fsdp_and_deepspeed_are_refused_before_the_model_is_built(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP is not supported.*accelerate launch --multi_gpu"):
        train_main([*SHORT, "--output_dir", str(tmp_path)])
    assert not (tmp_path / "run.json").exists()


def test_fp16_on_a_cpu_is_recorded_as_what_ran(tmp_path, fresh_accelerate_state):
    metrics = train_main([*SHORT, "--epochs", "1", "--output_dir", str(tmp_path), "--mixed_precision", "fp16"])
    assert metrics["mixed_precision"] == "no"  # accelerate runs fp16 in fp32 on a CPU


def test_the_tracker_gets_lr_grad_norm_and_test_accuracies(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_main([*SHORT, "--epochs", "1", "--output_dir", str(tmp_path), "--report_to", "tensorboard"])
    events = EventAccumulator(str(next((tmp_path / "dpt_peft").rglob("events.out.tfevents.*")).parent)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/grad_norm", "train/lr_visual", "train/lr_text", "test/accuracy", "test/zero_shot_accuracy"} <= tags


def test_a_saved_pipeline_loads_back_and_classifies_the_same(tmp_path):
    clip = load_base_model()
    from peft import get_peft_model

    adapter = get_peft_model(clip, DPTConfig(class_names=["circle", "square", "triangle"], num_text_tokens=4))
    classifier = pipeline("dpt-image-classification", model=adapter, device="cpu")
    image = toy_dataset("shape")["test"][0]["image"]
    classifier.save_pretrained(tmp_path / "pipe")
    assert not list((tmp_path / "pipe").glob("*.py"))  # no custom code: `import dpt_peft` registers the pipeline
    reloaded = pipeline("dpt-image-classification", model=AutoDPTModel.from_pretrained(tmp_path / "pipe"), device="cpu")
    assert [r["label"] for r in reloaded(image)] == [r["label"] for r in classifier(image)]
    assert reloaded(image)[0]["score"] == pytest.approx(classifier(image)[0]["score"], abs=1e-5)
