"""PEFT's tuner API on a DPT model behaves as on PEFT's own methods: disabling layers, adapter names, merging, dtype."""

from __future__ import annotations

import pytest
import torch
from helpers import CLASS_NAMES
from peft import PeftModel, get_peft_model
from transformers import AutoTokenizer, CLIPModel

from dpt_peft import DPTConfig
from dpt_peft.layer import MERGE_REFUSAL


def _model(clip_path: str, **config) -> PeftModel:
    torch.manual_seed(0)
    return get_peft_model(CLIPModel.from_pretrained(clip_path), DPTConfig(class_names=CLASS_NAMES, **config)).eval()


@pytest.mark.parametrize(
    "config",
    [
        {"text_encoding": "full"},
        {"text_encoding": "shared_prefix"},
        {"text_encoding": "auto", "text_init": "a photo of a"},
        {"class_specific_context": True, "class_aware": False},
        {"learn_text_context": False},
    ],
    ids=["full", "shared_prefix", "auto_phrase", "class_specific", "visual_only"],
)
def test_disabled_adapter_layers_give_the_base_clip_on_every_text_path(clip_path, pixel_values, config):
    """`disable_adapter_layers()` (what TRL and others call) gives the base CLIP's zero-shot classifier: the logits
    of CLIP itself under `with model.disable_adapter():`. `enable_adapter_layers()` gives the prompts back."""
    model = _model(clip_path, **config)
    tokenizer = AutoTokenizer.from_pretrained(clip_path)
    texts = [f"a photo of a {name.replace('_', ' ')}." for name in CLASS_NAMES]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        with model.disable_adapter():
            expected = model(input_ids=batch["input_ids"], pixel_values=pixel_values).logits_per_image
        prompted = model(pixel_values=pixel_values).logits
        model.disable_adapter_layers()
        disabled = model(pixel_values=pixel_values).logits
        model.enable_adapter_layers()
        enabled = model(pixel_values=pixel_values).logits
    torch.testing.assert_close(disabled, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enabled, prompted, rtol=0, atol=0)
    assert not torch.allclose(prompted, expected, atol=1e-3)


@pytest.mark.parametrize("name", ["c", "x", "text", "layers", "default2"])
def test_an_adapter_loads_under_any_name(clip_path, tmp_path, pixel_values, name):
    """Names that are parts of module paths ("c" in "encoder", "text" in "text_model") are adapter names like any."""
    model = _model(clip_path)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits
        model.load_adapter(str(tmp_path), adapter_name=name)
        model.set_adapter(name)
        torch.testing.assert_close(model(pixel_values=pixel_values).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["merge_adapter", "unmerge_adapter", "merge_and_unload"])
def test_merging_is_refused_with_one_message(clip_path, method):
    with pytest.raises(NotImplementedError) as raised:
        getattr(_model(clip_path), method)()
    assert str(raised.value) == MERGE_REFUSAL and "unload()" in MERGE_REFUSAL


@pytest.mark.parametrize(("autocast", "dtype"), [(True, torch.float32), (False, torch.bfloat16)])
def test_autocast_adapter_dtype_is_honoured(clip_path, tmp_path, pixel_values, autocast, dtype):
    _model(clip_path).save_pretrained(tmp_path)
    base = CLIPModel.from_pretrained(clip_path, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, str(tmp_path), autocast_adapter_dtype=autocast).eval()
    assert {p.dtype for _, p in model.base_model.adapter_parameters().values()} == {dtype}
    with torch.no_grad():
        assert torch.isfinite(model(pixel_values=pixel_values.bfloat16()).logits).all()
