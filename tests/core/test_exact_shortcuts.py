"""Every speed shortcut is exact, and the benchmark runs (no timing assertions here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CLASS_NAMES
from peft import get_peft_model
from transformers import CLIPModel

from dpt_peft import DPTConfig

REPO = Path(__file__).resolve().parents[2]


def build(clip_path, attn="sdpa", **config):
    torch.manual_seed(0)
    clip = CLIPModel.from_pretrained(clip_path, attn_implementation=attn)
    return get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES, num_text_tokens=3, **config)).eval()


def test_padding_prompts_to_the_full_context_gives_the_same_logits(clip_path, pixel_values):
    padded = build(clip_path, pad_text_to_context=True)
    cut = build(clip_path)
    assert padded.base_model.task_classes("default").prompt_layout.input_ids.shape[1] == 24
    assert cut.base_model.task_classes("default").prompt_layout.input_ids.shape[1] < 24
    with torch.no_grad():
        torch.testing.assert_close(
            cut(pixel_values=pixel_values).logits, padded(pixel_values=pixel_values).logits, rtol=1e-5, atol=1e-5
        )


def test_sdpa_and_eager_attention_give_the_same_logits(clip_path, pixel_values):
    with torch.no_grad():
        torch.testing.assert_close(
            build(clip_path, "sdpa")(pixel_values=pixel_values).logits,
            build(clip_path, "eager")(pixel_values=pixel_values).logits,
            rtol=1e-5,
            atol=1e-5,
        )


def test_class_features_are_recomputed_when_caching_is_off(clip_path, pixel_values):
    model = build(clip_path, cache_class_features=False)
    calls = []
    features = model.base_model.class_features
    original = features.encode_text
    features.encode_text = lambda *a, **k: calls.append(1) or original(*a, **k)
    with torch.no_grad():
        model(pixel_values=pixel_values)
        model(pixel_values=pixel_values)
    assert len(calls) == 4  # learned + zero-shot features, every call


def test_gradient_checkpointing_gives_the_same_gradients(clip_path, pixel_values, labels):
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        clip = CLIPModel.from_pretrained(clip_path)
        if checkpointing:
            clip.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES, num_text_tokens=3)).train()
        model(pixel_values=pixel_values, labels=labels).loss.backward()
        gradients.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], rtol=1e-6, atol=1e-7)


def test_mixed_precision_forward_stays_close_to_fp32(clip_path, pixel_values):
    model = build(clip_path)
    with torch.no_grad():
        full = model(pixel_values=pixel_values).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(pixel_values=pixel_values).logits
    assert half.argmax(-1).eq(full.argmax(-1)).float().mean() >= 0.75
    torch.testing.assert_close(half.float(), full, rtol=0.05, atol=0.3)


@pytest.mark.slow
def test_benchmark_script_runs_on_a_tiny_model(tmp_path):
    output = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "bench_train.py"),
        "--shape",
        "tiny",
        "--classes",
        "3",
        "--methods",
        "dpt",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--batch_size",
        "4",
        "--json",
        str(output),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = json.loads(output.read_text())
    assert [row["text_encoding"] for row in rows] == ["auto", "full"]  # one row per text path of ours
    for row in rows:
        for key in (
            "method",
            "num_classes",
            "baseline_images_per_s",
            "images_per_s",
            "speedup",
            "baseline_peak_mem_mb",
            "peak_mem_mb",
            "device",
            "flops_per_step",
            "text_share",
            "infer_cost_in_bare_passes",
            "max_logit_diff_fp32",
        ):
            assert row[key] is not None, key
        assert row["method"] == "dpt" and row["num_classes"] == 3 and row["flops_per_step"] > 0
        assert row["max_logit_diff_fp32"] < 1e-4 and 0 < row["text_share"]
        assert row["speedup"] == pytest.approx(row["images_per_s"] / row["baseline_images_per_s"])


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path):
    """`--torch_compile` (inductor through Accelerate): same result as the eager run. Slow on CPU (~2.5 min)."""
    from dpt_peft.cli import train_main

    common = ["--epochs", "2", "--shots", "4", "--report_to", "none"]
    eager = train_main([*common, "--output_dir", str(tmp_path / "eager")])
    compiled = train_main([*common, "--output_dir", str(tmp_path / "compiled"), "--torch_compile"])
    assert compiled["accuracy"] == pytest.approx(eager["accuracy"], abs=0.01)
    assert compiled["final_train_loss"] == pytest.approx(eager["final_train_loss"], rel=1e-4)
