"""Predict, the zero-shot pipeline, class-aware attention maps and nearest context tokens (issue 7)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from helpers import CLASS_NAMES
from peft import get_peft_model
from PIL import Image
from transformers import AutoImageProcessor, CLIPModel

from dpt_peft import DPTConfig, DPTZeroShotPipeline, predict
from dpt_peft.cli import predict_main, visualize_main
from dpt_peft.integrations.inference import expand_paths
from dpt_peft.integrations.visualize import class_aware_attention, nearest_context_tokens


@pytest.fixture
def model(clip_path):
    torch.manual_seed(0)
    return get_peft_model(CLIPModel.from_pretrained(clip_path), DPTConfig(class_names=CLASS_NAMES)).eval()


@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_predict_accepts_paths_images_and_tensors(model, clip_path, image_dir):
    paths = sorted(image_dir.glob("*.png"))
    by_path = predict(model, paths, top_k=3)
    by_image = predict(model, [Image.open(p) for p in paths], top_k=3)
    pixels = AutoImageProcessor.from_pretrained(clip_path)(images=[Image.open(p) for p in paths], return_tensors="pt")[
        "pixel_values"
    ]
    by_tensor = predict(model, [pixels], top_k=3)
    assert [p.source for p in by_path] == [str(p) for p in paths]
    for a, b, c in zip(by_path, by_image, by_tensor):
        assert a.labels == b.labels == c.labels and len(a.labels) == 3
        assert a.scores == pytest.approx(b.scores) and a.scores == pytest.approx(c.scores)
        assert a.scores == sorted(a.scores, reverse=True)
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits.softmax(-1)
    assert by_path[0].scores[0] == pytest.approx(expected[0].max().item(), rel=1e-5)


def test_predict_skips_unreadable_files_with_a_warning(model, image_dir, caplog):
    (image_dir / "broken.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        predictions = predict(model, expand_paths([image_dir]))
    assert len(predictions) == 3
    assert "broken.png" in caplog.text and "not a readable image" in caplog.text


def test_bad_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no image files"):
        expand_paths([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_paths([tmp_path / "missing.png"])


def test_pipeline_scores_equal_predict(model, image_dir):
    paths = sorted(image_dir.glob("*.png"))
    pipe = DPTZeroShotPipeline(model)  # the former name of DPTImageClassificationPipeline
    expected = predict(model, paths, top_k=3)
    single = pipe(str(paths[0]), top_k=3)
    assert [r["label"] for r in single] == expected[0].labels
    assert [r["score"] for r in single] == pytest.approx(expected[0].scores)
    batch = pipe([str(p) for p in paths], top_k=3, batch_size=3)
    assert len(batch) == 3
    # A batch of 3 and a batch of 1 take different kernels: equal labels, scores within float tolerance.
    for rows, prediction in zip(batch, expected):
        assert [r["label"] for r in rows] == prediction.labels
        assert [r["score"] for r in rows] == pytest.approx(prediction.scores, rel=1e-5, abs=1e-6)
    # Candidate labels are a per-call label space: softmax over them, and the adapter keeps its own classes.
    candidates = pipe(str(paths[0]), candidate_labels=["cat", "dog", "tree"], hypothesis_template="{}")
    assert {r["label"] for r in candidates} == {"cat", "dog", "tree"}
    assert sum(r["score"] for r in candidates) == pytest.approx(1.0)
    assert model.class_names() == CLASS_NAMES and predict(model, paths[:1], top_k=3)[0].labels == expected[0].labels


def test_attention_map_sums_to_one_over_patches_and_changes_with_class(model, image_dir):
    image = Image.open(next(image_dir.glob("*.png")))
    cat = class_aware_attention(model, image, "cat")
    tree = class_aware_attention(model, image, "tree")
    assert cat.weights.shape == (4, 4)  # 32 px images, patch 8
    assert cat.weights.sum().item() == pytest.approx(1.0, abs=1e-6) and (cat.weights >= 0).all()
    assert not torch.allclose(cat.weights, tree.weights)
    assert cat.layer == 2


def test_attention_map_is_the_forward_attention_of_that_class_prompt(model, clip_path, image_dir):
    image = Image.open(next(image_dir.glob("*.png")))
    pixels = AutoImageProcessor.from_pretrained(clip_path)(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        output = model(pixel_values=pixels, output_attentions=True)
    slot = 0
    name = CLASS_NAMES[output.class_aware_indices[0, slot]]
    forward = output.class_aware_attentions[0][0, slot, 1:17]
    torch.testing.assert_close(class_aware_attention(model, image, name).weights.flatten(), forward / forward.sum())


def test_attention_errors(clip_path, model, image_dir):
    image = Image.open(next(image_dir.glob("*.png")))
    with pytest.raises(ValueError, match=r"Class 'zebra' is not in the adapter's label space \['cat'"):
        class_aware_attention(model, image, "zebra")
    coop = get_peft_model(CLIPModel.from_pretrained(clip_path), DPTConfig.for_method("coop", class_names=CLASS_NAMES))
    with pytest.raises(ValueError, match="has no class-aware prompts.*class_aware=True"):
        class_aware_attention(coop, image, "cat")


def test_nearest_tokens_of_a_phrase_context_are_its_words(clip_path):
    model = get_peft_model(
        CLIPModel.from_pretrained(clip_path),
        DPTConfig(class_names=CLASS_NAMES, text_init="a photo of a", num_visual_tokens=0),
    )
    nearest = nearest_context_tokens(model, k=2)
    assert [row[0][0] for row in nearest] == ["a", "photo", "of", "a"]
    assert all(row[0][1] == pytest.approx(1.0) for row in nearest)


def test_predict_and_visualize_commands(clip_path, model, image_dir, tmp_path, capsys):
    model.save_pretrained(tmp_path / "adapter")
    (image_dir / "broken.png").write_bytes(b"xx")
    output = tmp_path / "predictions.jsonl"
    rows = predict_main(
        [
            "--model_name_or_path",
            clip_path,
            "--adapter",
            str(tmp_path / "adapter"),
            str(image_dir),
            "--top_k",
            "2",
            "--output",
            str(output),
        ]
    )
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert written == rows and len(rows) == 3 and len(rows[0]["labels"]) == 2
    assert "3 images classified, 1 skipped" in capsys.readouterr().out
    (image_dir / "broken.png").unlink()
    figures = visualize_main(
        [
            "--model_name_or_path",
            clip_path,
            "--adapter",
            str(tmp_path / "adapter"),
            str(image_dir),
            "--output_dir",
            str(tmp_path / "figures"),
            "--context",
        ]
    )
    assert len(figures) == 3 and all((tmp_path / "figures" / f"{i}.png").stat().st_size > 1000 for i in range(3))
    assert "context 0:" in capsys.readouterr().out


def test_commands_load_the_base_model_the_adapter_records(model, image_dir, tmp_path):
    """No --model_name_or_path: the tiny CLIP of another shape than the toy one is found from adapter_config.json."""
    model.save_pretrained(tmp_path / "adapter")
    output = ["--output", str(tmp_path / "predictions.jsonl")]
    rows = predict_main(["--adapter", str(tmp_path / "adapter"), str(image_dir), "--top_k", "1", *output])
    assert len(rows) == 3 and all(len(row["labels"]) == 1 for row in rows)
    figures = visualize_main(
        ["--adapter", str(tmp_path / "adapter"), str(image_dir), "--output_dir", str(tmp_path / "f")]
    )
    assert len(figures) == 3


def test_an_adapter_loads_onto_the_base_model_it_records(model, clip_path, tmp_path, pixel_values):
    """A CLIP that is not the toy one (other widths): the loader takes the base from adapter_config.json."""
    from dpt_peft.sources import load_adapted_model

    model.save_pretrained(tmp_path / "adapter")
    loaded, _ = load_adapted_model(str(tmp_path / "adapter"), device="cpu")
    assert loaded.get_base_model().name_or_path == clip_path
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixel_values).logits, model(pixel_values=pixel_values).logits)


def test_an_adapter_without_a_recorded_base_needs_one_named(model, tmp_path):
    from dpt_peft.sources import load_adapted_model

    model.save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(ValueError, match="records no base model.*--model_name_or_path"):
        load_adapted_model(str(tmp_path / "adapter"), device="cpu")


def test_a_url_given_to_predict_is_named_as_a_url_not_folded_into_a_path():
    """Issue 31: `predict http://127.0.0.1:PORT/ok.png` said "http:/127.0.0.1:PORT/ok.png does not exist"."""
    from dpt_peft.integrations.inference import expand_paths
    from dpt_peft.utils.errors import UserInputError

    with pytest.raises(UserInputError, match=r"^http://127.0.0.1:8000/ok.png is a URL; .*pipeline"):
        expand_paths(["http://127.0.0.1:8000/ok.png"])
