"""--zero_shot_ensemble through `predict`, the pipeline, `evaluate` and the CLI (issue 27, item 4): the weight reaches
the model's `set_zero_shot_ensemble` for the call (the adapter's own setting is put back after), every report records
the weight in effect, a bad weight is refused in one line, and a model that cannot mix in zero-shot is refused.

The model's mixing itself is the core's (tests/core); here the forward records the weight in effect, so these tests pin
the plumbing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image
from helpers import CLASS_NAMES
from peft import get_peft_model
from PIL import Image as PILImage
from transformers import AutoImageProcessor, CLIPModel

from dpt_peft import DPTConfig, predict
from dpt_peft.cli import evaluate_main, predict_main
from dpt_peft.integrations.pipeline import DPTImageClassificationPipeline
from dpt_peft.peft_model import DPTPeftModel
from dpt_peft.training.ensemble import checked_weight, ensemble_in_effect, set_zero_shot_ensemble
from dpt_peft.training.evaluation import EvaluationSpec, evaluate
from dpt_peft.utils.errors import UserInputError


@pytest.fixture
def seen(monkeypatch) -> list:
    """The weight in effect at each forward."""
    weights: list = []
    original = DPTPeftModel.forward

    def forward(self, *args, **kwargs):
        weights.append(ensemble_in_effect(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DPTPeftModel, "forward", forward)
    return weights


@pytest.fixture
def model(clip_path):
    torch.manual_seed(0)
    model = get_peft_model(CLIPModel.from_pretrained(clip_path), DPTConfig(class_names=CLASS_NAMES)).eval()
    return model


def images(count: int = 3) -> list[PILImage.Image]:
    rng = np.random.default_rng(0)
    return [PILImage.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]


def test_predict_uses_the_weight_for_the_call_only(model, seen):
    predict(model, images(), zero_shot_ensemble=0.5)
    assert seen == [0.5] and ensemble_in_effect(model) is None
    predict(model, images())
    assert seen == [0.5, None]


def test_the_pipeline_uses_the_weight_for_the_call_only(model, seen, clip_path):
    classifier = DPTImageClassificationPipeline(model, image_processor=AutoImageProcessor.from_pretrained(clip_path))
    classifier(images(1)[0], zero_shot_ensemble=0.25)
    assert seen == [0.25] and ensemble_in_effect(model) is None
    with pytest.raises(UserInputError, match="zero_shot_ensemble=1.5"):
        classifier(images(1)[0], zero_shot_ensemble=1.5)


@pytest.mark.parametrize("weight", [-0.1, 1.5, float("nan"), float("inf")])
def test_a_weight_outside_0_1_is_refused_in_one_line(weight):
    with pytest.raises(UserInputError, match="in \\[0, 1\\]") as refused:
        checked_weight(weight)
    assert "\n" not in str(refused.value)


def test_a_model_without_a_zero_shot_classifier_is_refused_in_one_line():
    with pytest.raises(UserInputError, match="Linear has no zero-shot classifier") as refused:
        set_zero_shot_ensemble(torch.nn.Linear(2, 2), 0.5)
    assert "\n" not in str(refused.value)
    set_zero_shot_ensemble(torch.nn.Linear(2, 2), None)  # nothing asked: nothing refused


def adapter_and_split(model, tmp_path) -> tuple[str, Dataset]:
    model.save_pretrained(str(tmp_path / "adapter"))
    features = Features({"image": Image(), "label": ClassLabel(names=CLASS_NAMES)})
    split = Dataset.from_dict({"image": images(5), "label": list(range(5))}, features=features)
    return str(tmp_path / "adapter"), split


def test_evaluate_records_the_weight_it_used(model, seen, tmp_path, clip_path):
    adapter, split = adapter_and_split(model, tmp_path)
    spec = EvaluationSpec(adapter, split, CLASS_NAMES, model_name_or_path=clip_path, zero_shot_ensemble=0.5)
    assert evaluate(spec)["zero_shot_ensemble"] == 0.5 and seen == [0.5]
    assert (
        evaluate(EvaluationSpec(adapter, split, CLASS_NAMES, model_name_or_path=clip_path))["zero_shot_ensemble"]
        is None
    )


def test_the_commands_pass_the_weight_and_record_it(model, seen, tmp_path, clip_path):
    adapter, _ = adapter_and_split(model, tmp_path)
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(images()):
        image.save(folder / f"{index}.png")
    flags = ["--adapter", adapter, "--model_name_or_path", clip_path, "--zero_shot_ensemble", "0.5"]
    rows = predict_main([*flags, str(folder), "--output", str(tmp_path / "predictions.jsonl")])
    assert [row["zero_shot_ensemble"] for row in rows] == [0.5] * 3 and seen == [0.5]
    written = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert written == rows
    data = tmp_path / "data" / "test"  # evaluate reads a dataset by name: an imagefolder
    for index, name in enumerate(CLASS_NAMES):
        (data / name).mkdir(parents=True)
        images(1)[0].save(data / name / f"{index}.png")
    report = evaluate_main([*flags, "--dataset", str(tmp_path / "data"), "--output_dir", str(tmp_path / "eval")])
    assert report["zero_shot_ensemble"] == 0.5
    assert json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())["zero_shot_ensemble"] == 0.5


@pytest.mark.parametrize("command", [evaluate_main, predict_main])
def test_the_flag_refuses_a_weight_outside_0_1(command, capsys):
    with pytest.raises(SystemExit):
        command(["--adapter", "x", "--zero_shot_ensemble", "1.5", "image.png"])
    assert "give the adapter's weight as a number in [0, 1]" in capsys.readouterr().err
