"""A saved adapter someone else wrote (issue 31): sizes far beyond any model, texts of the wrong type, a tensor the
adapter does not have, no family, control characters in class names, and a base model path that is no model: each is
refused by name before anything is built or allocated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import CLIPModel

from dpt_peft import AutoDPTModel, DPTConfig
from dpt_peft.utils.errors import UserInputError


@pytest.fixture(scope="module")
def adapter(clip_path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(
        CLIPModel.from_pretrained(clip_path), DPTConfig(class_names=["cat", "dog"], num_text_tokens=2)
    )
    model.save_pretrained(folder)
    return folder


def edited(adapter: Path, tmp_path: Path, config: dict | None = None, drop: str | None = None, tensors=None) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(adapter, folder)
    content = json.loads((folder / "adapter_config.json").read_text())
    content.update(config or {})
    content.pop(drop, None)
    (folder / "adapter_config.json").write_text(json.dumps(content))
    if tensors:
        weights = load_file(folder / "adapter_model.safetensors")
        save_file({**weights, **tensors}, folder / "adapter_model.safetensors")
    return folder


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"vision_num_layers": 10**12, "visual_depth": 10**12}, r"visual_depth=1000000000000 is beyond any model"),
        ({"class_aware_layer": 10**12}, r"class_aware_layer=1000000000000 is beyond any model"),
        ({"zero_shot_template": 5}, r"zero_shot_template=5 must be text"),
        ({"num_text_tokens": "4"}, r"num_text_tokens='4' must be a whole number"),
        ({"class_names": ["cat\rdog", "bird"]}, r"control character"),
    ],
)
def test_a_hostile_config_is_refused_by_name_before_anything_is_built(adapter, clip, tmp_path, config, message):
    with pytest.raises(UserInputError, match=message):
        PeftModel.from_pretrained(clip, edited(adapter, tmp_path, config))


def test_an_extra_tensor_in_the_weights_is_refused(adapter, clip, tmp_path):
    folder = edited(adapter, tmp_path, tensors={"base_model.model.text_model.extra.weight": torch.zeros(3)})
    with pytest.raises(UserInputError, match=r"unexpected \['base_model.model.text_model.extra.weight'\]"):
        PeftModel.from_pretrained(clip, folder)


def test_an_adapter_that_records_no_family_is_refused(adapter, clip, tmp_path):
    """The toy CLIP and toy SigLIP share their shapes: without its family a SigLIP adapter would load into CLIP."""
    with pytest.raises(UserInputError, match=r'records the base model\'s shape but not its family.*"clip"'):
        PeftModel.from_pretrained(clip, edited(adapter, tmp_path, drop="base_model_family"))


def test_a_base_model_path_that_is_no_model_names_the_adapter_field(adapter, tmp_path):
    folder = edited(adapter, tmp_path, {"base_model_name_or_path": str(tmp_path / "not_a_model")})
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(UserInputError, match=r"base_model_name_or_path in the adapter's adapter_config.json"):
        AutoDPTModel.from_pretrained(str(folder))


def test_class_names_with_control_characters_are_refused_at_the_config():
    for name in ("a\x1b[31mred", "bell\x07", "nul\x00", "two\rlines"):
        with pytest.raises(UserInputError, match="control character"):
            DPTConfig(class_names=["cat", name])


def test_a_toy_siglip_adapter_claiming_clip_is_refused_by_the_toy_clip(tmp_path):
    """The toy CLIP and toy SigLIP share every size: a SigLIP adapter whose config says "clip" is told apart by the
    shipped base it records."""
    from dpt_peft.sources import load_base_model

    siglip = get_peft_model(load_base_model("dpt-peft/toy-siglip"), DPTConfig(class_names=["circle", "square"]))
    siglip.save_pretrained(tmp_path / "adapter")
    folder = edited(tmp_path / "adapter", tmp_path, {"base_model_family": "clip"})
    with pytest.raises(UserInputError, match=r"made for the shipped dpt-peft/toy-siglip .*not for dpt-peft/toy-clip"):
        PeftModel.from_pretrained(load_base_model(), folder)
