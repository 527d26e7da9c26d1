"""`dpt-peft evaluate` and `predict` as a new user meets them: another dataset's template, refusals before any work,
what `--output` replaces."""

from __future__ import annotations

import json

import pytest
from coop_layouts import make_layout
from peft import get_peft_model
from PIL import Image

from dpt_peft import DPTConfig
from dpt_peft.cli import evaluate_main, predict_main
from dpt_peft.data.catalog import COOP_DATASETS
from dpt_peft.sources import load_base_model
from dpt_peft.toy.tasks import toy_dataset
from dpt_peft.training import evaluation

TOY_CLASSES = toy_dataset("position")["test"].features["label"].names


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> str:
    """An untrained adapter of the toy CLIP on the toy task's classes (the default dataset of `evaluate`)."""
    folder = tmp_path_factory.mktemp("adapter")
    config = DPTConfig(class_names=TOY_CLASSES, num_text_tokens=4, num_visual_tokens=2, class_aware_top_k=2)
    get_peft_model(load_base_model(), config).save_pretrained(folder)
    return str(folder)


def test_a_coop_dataset_is_prompted_with_its_own_template_unless_one_is_given(adapter, tmp_path):
    """Issue 32, item 7: an adapter trained elsewhere, evaluated on a CoOp dataset (the issue's EuroSAT; DTD here,
    whose template fits the toy CLIP's 16 positions), prompts its classes with the dataset's own template (as the
    benchmark scores transfer targets, the adapter having learned none of its classes); --zero_shot_template overrides
    it; both are recorded; the toy task keeps the adapter's own."""
    shapes = [(name.capitalize(), name) for name in ("circle", "square", "triangle")]  # words the toy CLIP knows
    make_layout(tmp_path / "data", "dtd", counts={"train": 1, "val": 1, "test": 2}, classes=shapes)
    data = ["--adapter", adapter, "--dataset", "dtd", "--data_root", str(tmp_path / "data")]
    report = evaluate_main([*data, "--output_dir", str(tmp_path / "own")])
    assert report["zero_shot_template"] == COOP_DATASETS["dtd"].template == "{} texture."
    written = json.loads((tmp_path / "own" / "eval_metrics.json").read_text())
    assert written["zero_shot_template"] == report["zero_shot_template"] and report["num_images"] == 6
    given = evaluate_main(
        [*data, "--zero_shot_template", "a blurry photo of a {}.", "--output_dir", str(tmp_path / "g")]
    )
    assert given["zero_shot_template"] == "a blurry photo of a {}."
    toy = evaluate_main(["--adapter", adapter, "--output_dir", str(tmp_path / "toy"), "--eval_batch_size", "600"])
    assert toy["zero_shot_template"] == DPTConfig(class_names=TOY_CLASSES).zero_shot_template


@pytest.mark.parametrize(
    ("flags", "refusal"),
    [
        (["--base_to_new"], "trained on 2 of the 'new' classes.*--subsample_classes base"),
        (["--new_classes", "left,right"], "trained on 2 of the 'new' classes"),
        (["--zero_shot_template", "a photo"], r"zero_shot_template='a photo' must contain exactly one '\{\}'"),
    ],
)
def test_refusals_the_adapter_and_flags_decide_come_before_the_model_loads(
    adapter, tmp_path, monkeypatch, flags, refusal
):
    """Issue 32, item 14: README's `evaluate --base_to_new` on an adapter trained on every class was refused after the
    whole evaluation; now before the base model loads or an image is read (loading it here would fail the test)."""

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(evaluation, "load_adapted_model", no_work)
    with pytest.raises(ValueError, match=refusal):
        evaluate_main(["--adapter", adapter, "--output_dir", str(tmp_path / "eval"), *flags])
    assert not (tmp_path / "eval" / "eval_metrics.json").exists()


def test_a_class_specific_context_is_refused_for_base_and_new_halves_before_loading(tmp_path, monkeypatch):
    """Item 14: a class-specific context serves only as many classes as it learned; base/new halves are refused
    before any work, naming the count."""
    folder = tmp_path / "specific"
    config = DPTConfig(class_names=TOY_CLASSES[:3], num_text_tokens=4, class_specific_context=True, num_visual_tokens=0)
    get_peft_model(load_base_model(), config).save_pretrained(folder)
    monkeypatch.setattr(evaluation, "load_adapted_model", lambda *a, **k: pytest.fail("loaded before the refusal"))
    with pytest.raises(ValueError, match="one context per class for 3 classes; it cannot serve 2"):
        evaluate_main(["--adapter", str(folder), "--output_dir", str(tmp_path / "eval"), "--base_to_new"])


def test_predict_replaces_its_own_output_and_refuses_a_file_it_did_not_write(adapter, tmp_path):
    """Issue 32, item 16, as README now says: an --output file that predict wrote (recorded in the folder's manifest,
    unchanged since) is replaced by the next run; any other existing file only with --overwrite_output."""
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (32, 32), colour).save(images / f"{i}.png")
    output = tmp_path / "out" / "predictions.jsonl"
    command = ["--adapter", adapter, str(images), "--output", str(output), "--top_k", "2"]
    first = predict_main(command)
    assert len(first) == 2 and len(output.read_text().splitlines()) == 2
    assert predict_main(command) == first  # its own earlier file: replaced, same rows
    output.write_text("someone's notes\n")  # no longer the file predict wrote
    with pytest.raises(ValueError, match="dpt_peft did not write it.*--overwrite_output to replace it"):
        predict_main(command)
    assert output.read_text() == "someone's notes\n"
    predict_main([*command, "--overwrite_output"])
    assert len(output.read_text().splitlines()) == 2
