"""Bad input gets an error naming the field and the fix; every image is decoded the same, robust way; adapters
load without the paths and sources they were made from."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import CLASS_NAMES, save_tiny_clip
from peft import PeftModel, get_peft_model
from PIL import Image
from transformers import CLIPModel

from dpt_peft import DPTConfig, predict
from dpt_peft.cli import _figure_names, parse_args, predict_main, train_main
from dpt_peft.data.batching import ImageBatcher, undecoded
from dpt_peft.data.datasets import load_image_dataset
from dpt_peft.data.few_shot import draw_shots
from dpt_peft.data.images import open_rgb


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("class_aware_loss_weight", float("nan"), "class_aware_loss_weight=nan must be a finite number"),
        ("prompt_init_std", float("inf"), "prompt_init_std=inf must be a finite number"),
        ("num_text_tokens", 4.5, "num_text_tokens=4.5 must be a whole number"),
        ("class_aware_top_k", True, "class_aware_top_k=True must be a whole number"),
        ("visual_depth", "3", "visual_depth='3' must be a whole number"),
    ],
)
def test_config_rejects_non_finite_and_non_integer_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        DPTConfig(class_names=CLASS_NAMES, **{field: value})


@pytest.fixture
def model(clip):
    return get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES)).eval()


def test_forward_input_mistakes_are_named(model, pixel_values, labels):
    with pytest.raises(ValueError, match=r"without a batch dimension; pass pixel_values.unsqueeze\(0\)"):
        model(pixel_values=pixel_values[0])
    with pytest.raises(ValueError, match="non-empty batch"):
        model(pixel_values=pixel_values[:0])
    with pytest.raises(ValueError, match="torch.uint8, raw pixel values; normalize them"):
        model(pixel_values=(pixel_values * 50).clamp(0, 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"one-hot; pass class indices.*argmax"):
        model(pixel_values=pixel_values, labels=torch.nn.functional.one_hot(labels, len(CLASS_NAMES)))
    with pytest.raises(ValueError, match=r"labels must lie in 0..4"):
        model(pixel_values=pixel_values, labels=torch.tensor([0, 1, 2, 9]))
    with torch.no_grad():
        from_list = model(pixel_values=pixel_values, labels=labels.tolist()).loss
        from_tensor = model(pixel_values=pixel_values, labels=labels).loss
    torch.testing.assert_close(from_list, from_tensor)


def test_high_bit_depth_and_float_images_are_scaled_not_clipped(tmp_path):
    grey16 = np.full((8, 8), 32768, dtype=np.uint16)  # half of full scale
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    assert np.asarray(Image.open(tmp_path / "grey16.png").convert("RGB")).max() == 255  # what convert() alone does
    assert np.asarray(open_rgb(tmp_path / "grey16.png")) == pytest.approx(np.full((8, 8, 3), 128), abs=1)
    floats = Image.fromarray(np.full((8, 8), 0.25, dtype=np.float32))
    assert np.asarray(open_rgb(floats)) == pytest.approx(np.full((8, 8, 3), 64), abs=1)


def test_a_decompression_bomb_is_skipped_and_counted_once(tmp_path, model):
    # A small file that becomes a bomb once resized for the model: its short side of 1 pixel goes to 512, so its
    # 200000 x 1 pixels become 102 million x 512, over PIL's limit (the guard bounds the resized size).
    Image.fromarray(np.zeros((1, 200_000, 3), dtype=np.uint8)).save(tmp_path / "bomb.png")
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(tmp_path / "fine.png")
    assert (tmp_path / "bomb.png").stat().st_size < 5000
    paths = [tmp_path / "bomb.png", tmp_path / "fine.png"]
    processor = __import__("dpt_peft.toy.pretrain", fromlist=["image_processor"]).image_processor()
    assert [p.source for p in predict(model, paths, processor=processor)] == [str(tmp_path / "fine.png")]
    batcher = ImageBatcher(processor, "image", "label")
    rows = [{"image": {"path": str(p), "bytes": None}, "label": 0} for p in paths]
    for _ in range(3):  # three epochs meet the same bad image
        assert batcher(rows)["pixel_values"].shape[0] == 1
    assert batcher.skipped == [str(tmp_path / "bomb.png")]


def image_folder(root, per_class: int = 3, broken: dict[str, int] | None = None):
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            path = root / name / f"{i}.png"
            if i < (broken or {}).get(name, 0):
                path.write_bytes(b"not a png")
            else:
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
    return root


def test_an_unreadable_shot_is_replaced_by_another_image_of_its_class(tmp_path):
    dataset = load_image_dataset(str(image_folder(tmp_path / "data", per_class=4, broken={"cat": 2})))["train"]
    train, rest = draw_shots(dataset, "label", ["cat", "dog"], shots=2, seed=0)
    view = undecoded(train, "image")
    assert sorted(view["label"]) == [0, 0, 1, 1] and len(rest) == 4
    for row in view:
        open_rgb(row["image"]["path"])  # every chosen shot decodes
    with pytest.raises(ValueError, match="Class 'cat' has too few readable images"):
        draw_shots(dataset, "label", ["cat", "dog"], shots=3, seed=0)


def test_a_flat_or_one_class_folder_is_explained(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(flat / f"{i}.png")
    with pytest.raises(ValueError, match="one subfolder per class"):
        load_image_dataset(str(flat))
    (tmp_path / "one" / "cat").mkdir(parents=True)
    shutil.copy(flat / "0.png", tmp_path / "one" / "cat" / "0.png")
    shutil.copy(flat / "1.png", tmp_path / "one" / "cat" / "1.png")
    with pytest.raises(ValueError, match="one subfolder per class"):
        load_image_dataset(str(tmp_path / "one"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--min_crop_scale", "5"], "area fraction"),
        (["--visual_lr", "-1"], "positive, finite learning rate"),
        (["--text_lr", "inf"], "positive, finite learning rate"),
        (["--guidance_epochs", "-2"], "0 or more epochs"),
        (["--prototype_max_images", "0"], "at least 1"),
    ],
)
def test_training_flags_are_checked(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_args(flags)


def test_predict_checks_its_flags_and_output_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        predict_main(["--adapter", "missing", str(tmp_path), "--top_k", "0"])
    assert "--top_k 0 must be at least 1" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="a_file is a file, not a folder; choose another --output"):
        predict_main(["--adapter", "missing", str(tmp_path), "--output", str(tmp_path / "a_file" / "out.jsonl")])


def test_visualize_names_every_figure_uniquely():
    names = _figure_names(["a/cat.png", "b/cat.jpg", "b/cat.png", "c/dog.png"])
    assert len(set(names)) == 4 and names[-1] == "dog.png"


def test_an_adapter_loads_after_its_clip_moved_and_its_sources_were_deleted(tmp_path, pixel_values):
    clip_dir = save_tiny_clip(tmp_path / "clip")
    source = get_peft_model(CLIPModel.from_pretrained(clip_dir), DPTConfig(class_names=CLASS_NAMES))
    source.save_pretrained(tmp_path / "source")
    model = get_peft_model(
        CLIPModel.from_pretrained(clip_dir), DPTConfig(class_names=CLASS_NAMES, init_from=[str(tmp_path / "source")])
    ).eval()
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["init_from"] is None and saved["initialized_from"] == [str(tmp_path / "source")]
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits
    shutil.rmtree(tmp_path / "source")
    shutil.move(clip_dir, tmp_path / "moved")  # the recorded base_model_name_or_path no longer exists
    loaded = PeftModel.from_pretrained(CLIPModel.from_pretrained(tmp_path / "moved"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixel_values).logits, expected)


def test_toy_adapters_record_no_path_of_this_machine(tmp_path):
    train_main(["--epochs", "1", "--shots", "2", "--report_to", "none", "--output_dir", str(tmp_path)])
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "dpt-peft/toy-clip"
    assert not [value for value in config.values() if isinstance(value, str) and value.startswith("/")]


def test_text_encoding_must_be_a_known_path():
    with pytest.raises(ValueError, match="text_encoding='fast'; use 'auto', 'shared_prefix' or 'full'"):
        DPTConfig(class_names=CLASS_NAMES, text_encoding="fast")


def test_other_class_names_are_for_inference_only(model, pixel_values, labels):
    with pytest.raises(ValueError, match="class_names classifies over other classes.*set_class_names"):
        model(pixel_values=pixel_values, labels=labels, class_names=["bird", "fish"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--eval_every", "-1"], "--eval_every -1 must be 0"),
        (["--dataloader_num_workers", "-2"], "--dataloader_num_workers -2 must be 0 or more"),
        (["--label_column", "shape", "--subsample_classes", "base"], "needs a ClassLabel column named 'label'"),
        (["--split_file", "split.json"], "--split_file applies to the CoOp benchmark datasets"),
    ],
)
def test_run_flags_that_cannot_apply_are_named(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        train_main(["--report_to", "none", "--output_dir", str(tmp_path / "run"), *flags])
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_validation_is_refused_where_val_would_be_the_test_split(tmp_path):
    from coop_layouts import make_layout

    make_layout(tmp_path / "data", "imagenet")
    argv = ["--dataset", "imagenet", "--data_root", str(tmp_path / "data"), "--shots", "1", "--eval_every", "1"]
    with pytest.raises(ValueError, match="imagenet has none apart from its test split"):
        train_main([*argv, "--report_to", "none", "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_predict_never_replaces_an_existing_file_unasked(tmp_path, capsys):
    existing = tmp_path / "mine.jsonl"
    existing.write_text("my notes\n")
    with pytest.raises(ValueError, match=r"dpt_peft did not write it \(it is not in .dpt_peft_written.json with this"):
        predict_main(["--adapter", "missing", str(tmp_path), "--output", str(existing)])
    assert existing.read_text() == "my notes\n"
