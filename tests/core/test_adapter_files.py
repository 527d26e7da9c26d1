"""Someone else's saved adapter: refused fast and by name when its config and weights disagree or are hostile."""

from __future__ import annotations

import json
import tracemalloc

import pytest
import torch
from helpers import CLASS_NAMES
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import CLIPModel

import dpt_peft.adapter_files as adapter_files
from dpt_peft import DPTConfig


@pytest.fixture
def saved(clip_path, tmp_path):
    torch.manual_seed(0)
    get_peft_model(CLIPModel.from_pretrained(clip_path), DPTConfig(class_names=CLASS_NAMES)).save_pretrained(tmp_path)
    return tmp_path


def _edit_config(folder, **values) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num_visual_tokens": 30_000_000}, r"num_visual_tokens=30000000, but layers\.0\.dpt_visual_prompts is \[10, "),
        ({"num_visual_tokens": 10**12}, "num_visual_tokens=1000000000000"),
        (
            {"class_names": [f"class {i}" for i in range(1_000_000)]},
            r"class_names=<1000000 names>, but the class-aware",
        ),
        ({"class_aware_num_kv_tokens": 4}, r"class_aware_num_kv_tokens=4, but layers.2.dpt_class_aware has \[10, "),
        ({"num_text_tokens": 40}, r"num_text_tokens=40, but .*dpt_context is \[16, "),
        ({"learn_text_context": False}, "learn_text_context=False, but .*dpt_context is saved"),
        ({"visual_depth": 1}, r"num_visual_tokens=10, but deep prompts are saved for vision layers \[0, 1\]"),
    ],
)
def test_a_config_that_disagrees_with_its_weights_is_refused_before_allocation(clip_path, saved, values, message):
    _edit_config(saved, **values)
    clip = CLIPModel.from_pretrained(clip_path)
    tracemalloc.start()
    with pytest.raises(ValueError, match=f"does not match its config: {message}"):
        PeftModel.from_pretrained(clip, saved)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Refused before anything is allocated (30M prompts of width 48 would take 5.8 GB). Measured on 2 CPU cores
    # (benchmarks are no timed tests): 1 ms for a size; 0.63 s and 81 MiB, the parsed JSON, for a million names.
    assert peak < 400 * 2**20, peak
    assert not any(".dpt_" in name for name, _ in clip.named_modules())


@pytest.mark.parametrize("value", ["false", "no", 0, None])
def test_booleans_must_be_booleans(clip_path, saved, value):
    _edit_config(saved, class_aware=value)
    with pytest.raises(ValueError, match=f"class_aware={value!r} must be true or false"):
        PeftModel.from_pretrained(CLIPModel.from_pretrained(clip_path), saved)


def test_init_from_is_ignored_on_load(clip_path, saved, tmp_path, pixel_values):
    """Sources initialize an adapter when it is made; a downloaded config must not make the loader read other paths."""
    expected = PeftModel.from_pretrained(CLIPModel.from_pretrained(clip_path), saved).eval()
    _edit_config(saved, init_from=[str(tmp_path / "elsewhere"), "someone/other-repo"])
    with pytest.warns(UserWarning, match="Ignoring init_from"):
        model = PeftModel.from_pretrained(CLIPModel.from_pretrained(clip_path), saved).eval()
    assert model.peft_config["default"].init_from is None
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixel_values).logits, expected(pixel_values=pixel_values).logits)


def test_non_finite_weights_are_refused_on_load(clip_path, saved):
    weights = saved / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if "dpt_visual_prompts" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights)
    clip = CLIPModel.from_pretrained(clip_path)
    with pytest.raises(ValueError, match=r"NaN or infinite values in .*dpt_visual_prompts"):
        PeftModel.from_pretrained(clip, saved)
    assert not any(".dpt_" in name for name, _ in clip.named_modules())


def test_an_oversized_config_is_not_read(clip_path, saved, monkeypatch):
    monkeypatch.setattr(adapter_files, "MAX_CONFIG_BYTES", 1024)
    with pytest.raises(ValueError, match=r"adapter_config.json is 0 MiB, more than the 0 MiB"):
        PeftModel.from_pretrained(CLIPModel.from_pretrained(clip_path), saved)


def test_a_header_that_claims_more_data_than_the_file_holds_is_named(clip_path, saved):
    weights = saved / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"adapter_model.safetensors is truncated or corrupt \(its header describes"):
        PeftModel.from_pretrained(CLIPModel.from_pretrained(clip_path), saved)
