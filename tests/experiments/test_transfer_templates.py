"""Cross-dataset and domain-generalization targets are scored with the target's own zero-shot template (as DPT builds
its model per dataset), for the zero-shot classifier and the CAVPT top-K alike; a resumed grid does not evaluate a
target twice; every grid checks its data before its first run."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from coop_layouts import make_layout
from datasets import ClassLabel, Dataset, Features, Image
from helpers import CLASS_NAMES
from peft import get_peft_model
from PIL import Image as PILImage

from dpt_peft import DPTConfig
from dpt_peft.experiments import benchmark
from dpt_peft.training.evaluation import EvaluationSpec, evaluate_adapter

OTHER_TEMPLATE = "the {} x."


def test_switching_the_template_rebuilds_the_zero_shot_classifier_and_the_top_k(clip, pixel_values):
    config = DPTConfig.for_method("dpt", class_names=CLASS_NAMES, num_text_tokens=2, class_aware_top_k=2)
    model = get_peft_model(copy.deepcopy(clip), config).eval()
    reference = get_peft_model(
        copy.deepcopy(clip), dataclasses.replace(config, zero_shot_template=OTHER_TEMPLATE)
    ).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        before = model(pixel_values=pixel_values, output_zero_shot_logits=True)
        model.set_class_names(CLASS_NAMES, zero_shot_template=OTHER_TEMPLATE)
        after = model(pixel_values=pixel_values, output_zero_shot_logits=True)
        expected = reference(pixel_values=pixel_values, output_zero_shot_logits=True)
    assert not torch.allclose(before.zero_shot_logits, after.zero_shot_logits)
    torch.testing.assert_close(after.zero_shot_logits, expected.zero_shot_logits)
    torch.testing.assert_close(after.logits, expected.logits)  # the CAVPT top-K followed the template too
    assert model.peft_config["default"].zero_shot_template == OTHER_TEMPLATE
    model.set_class_names(CLASS_NAMES)  # without a template, the current one stays
    assert model.peft_config["default"].zero_shot_template == OTHER_TEMPLATE


def test_eval_metrics_record_the_template_and_tell_repeated_names_apart(tmp_path, clip, clip_path):
    names = ["cat", "dog", "cat"]
    get_peft_model(clip, DPTConfig(class_names=names, num_text_tokens=1)).save_pretrained(tmp_path / "adapter")
    images = [f"{tmp_path}/{i}.png" for i in range(3)]
    for i, path in enumerate(images):
        PILImage.new("RGB", (32, 32), (40 * i, 90, 200)).save(path)
    features = Features({"image": Image(), "label": ClassLabel(names=["cat", "dog", "cat (2)"])})
    dataset = Dataset.from_dict({"image": images, "label": [0, 1, 2]}, features=features)
    with pytest.warns(UserWarning, match="more than once"):
        spec = EvaluationSpec(
            adapter=str(tmp_path / "adapter"),
            split=dataset,
            class_names=names,
            model_name_or_path=clip_path,
            zero_shot_template=OTHER_TEMPLATE,
        )
        report = evaluate_adapter(spec, str(tmp_path / "eval"))
    written = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert written["zero_shot_template"] == OTHER_TEMPLATE
    assert list(written["per_class_accuracy"]) == ["cat", "dog", "cat (2)"] and report["missing_images"] == 0


def test_targets_get_their_own_template_and_are_not_evaluated_twice(tmp_path, monkeypatch):
    calls = []

    def fake_evaluate(spec, out, **kwargs):
        calls.append((len(spec.class_names), spec.zero_shot_template))
        report = {
            "accuracy": 0.5,
            "zero_shot_template": spec.zero_shot_template,
            "skipped_images": 1,
            "missing_images": 0,
        }
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "eval_metrics.json").write_text(json.dumps(report))
        return report

    for name in ("imagenet", "eurosat", "dtd"):
        make_layout(tmp_path / "data", name)
    monkeypatch.setattr(benchmark, "evaluate_adapter", fake_evaluate)
    spec = benchmark.RunSpec("cross_dataset", "imagenet", "dpt", 16, 1)
    grid = benchmark.GridSpec("cross_dataset", str(tmp_path / "data"), str(tmp_path), ["imagenet"], [16], [1], ["dpt"])
    evaluation = benchmark.Evaluation(spec, tmp_path / "run" / "train", grid)
    metrics = {"accuracy": 0.7, "skipped_images": 2}
    result = evaluation.result(metrics, ["eurosat", "dtd"])
    assert calls == [(3, "a centered satellite photo of {}."), (2, "{} texture.")]
    assert result == {"source_accuracy": 0.7, "skipped_images": 4, "missing_images": 0, "eurosat": 0.5, "dtd": 0.5}
    assert evaluation.result(metrics, ["eurosat", "dtd"]) == result and len(calls) == 2  # read back on resume
    given_grid = dataclasses.replace(grid, config_options={"zero_shot_template": "{}."})
    given = benchmark.Evaluation(spec, tmp_path / "other" / "train", given_grid)
    given.result(metrics, ["eurosat"])
    assert calls[-1] == (3, "{}.")  # an explicit --zero_shot_template applies everywhere


def test_a_grid_checks_its_data_before_its_first_run(tmp_path, monkeypatch):
    make_layout(tmp_path / "data", "imagenet")
    trained = []
    monkeypatch.setattr(benchmark, "execute", lambda runs, executor, folder: trained.append(runs) or [])
    with pytest.raises(FileNotFoundError, match="ucf101: NOT READY") as error:
        benchmark.run_protocol(
            benchmark.GridSpec(
                protocol="cross_dataset",
                data_root=str(tmp_path / "data"),
                output_dir=str(tmp_path / "out"),
                datasets=["ucf101"],
                shots=[16],
                seeds=[1],
                methods=["dpt"],
            )
        )
    assert trained == [] and "DATASETS.md#ucf101" in str(error.value)
