"""Bad input fails early with an error that names the field and the fix, and leaves nothing half-built."""

from __future__ import annotations

import pytest
import torch
from helpers import CLASS_NAMES, save_tiny_clip, tiny_clip_config
from peft import PeftModel, get_peft_model
from transformers import CLIPConfig, CLIPModel, CLIPTextModel

from dpt_peft import DPTConfig
from dpt_peft.layer import DPTLayer


def is_untouched(clip: CLIPModel) -> bool:
    return not any(isinstance(m, DPTLayer) for m in clip.modules())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"class_names": []}, "class_names is empty"),
        ({"class_names": None}, "class_names is required"),
        ({"class_names": ["cat", ""]}, r"class_names\[1\]=''"),
        ({"class_names": {"a": ["x"], "b": []}}, r"class_names\['b'\] is empty"),
        ({"class_names": "cat"}, "must be a list of strings"),
        ({"num_text_tokens": 0}, "num_text_tokens=0.*at least 1 token"),
        ({"num_visual_tokens": -1}, "num_visual_tokens=-1 is negative"),
        ({"class_aware_num_kv_tokens": -2}, "class_aware_num_kv_tokens=-2 is negative"),
        ({"class_aware_top_k": 0}, "class_aware_top_k=0 must be at least 1"),
        ({"visual_depth": 0}, "visual_depth=0 must be at least 1.*num_visual_tokens=0"),
        ({"class_aware_layer": -1}, "class_aware_layer=-1"),
        ({"class_token_position": "start"}, "class_token_position='start'"),
        ({"zero_shot_template": "a photo of a"}, "zero_shot_template=.*exactly one"),
        ({"text_init": "  "}, "text_init is empty"),
        ({"class_aware_loss_weight": -1.0}, "class_aware_loss_weight"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DPTConfig(**{"class_names": CLASS_NAMES, **kwargs})


def test_unknown_method_preset():
    with pytest.raises(ValueError, match="method='lora' is unknown.*coop"):
        DPTConfig.for_method("lora", class_names=CLASS_NAMES)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"visual_depth": 4}, "visual_depth=4 exceeds the 3 vision layers.*1 to 3"),
        ({"class_aware_layer": 3}, "class_aware_layer=3 is not a vision layer.*0 to 2"),
        ({"num_text_tokens": 22}, "num_text_tokens=22 leaves no room"),
        (
            {"num_text_tokens": 17, "class_names": ["cat", "sea turtle sea turtle sea turtle"]},
            "prompt for class 'sea turtle sea turtle sea turtle' is 26 tokens.*context of 24",
        ),
        (
            {"zero_shot_template": "a photo of a {} " + "of the " * 9},
            r"zero-shot prompt .* for class '[a-z_ ]+' is \d+ tokens.*zero_shot_template",
        ),
    ],
)
def test_config_that_does_not_fit_the_model(clip, kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(clip, DPTConfig(**{"class_names": CLASS_NAMES, **kwargs}))
    assert is_untouched(clip)


def test_base_model_that_is_not_clip(clip_path):
    text_only = CLIPTextModel.from_pretrained(clip_path)
    with pytest.raises(TypeError, match="DPT adapts a transformers.CLIPModel.*, got CLIPTextModel"):
        get_peft_model(text_only, DPTConfig(class_names=CLASS_NAMES))


def test_missing_tokenizer(tmp_path):
    clip = CLIPModel(CLIPConfig(**tiny_clip_config()))  # built from a config: no name_or_path
    with pytest.raises(ValueError, match="No CLIP tokenizer found.*tokenizer_name_or_path"):
        get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES))
    with pytest.raises(
        ValueError, match=f"(?s)Could not load a CLIP tokenizer from '{tmp_path}'.*tokenizer_name_or_path"
    ):
        get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES, tokenizer_name_or_path=str(tmp_path)))
    assert is_untouched(clip)


def test_tokenizer_from_config_for_a_model_without_name(clip_path, pixel_values):
    clip = CLIPModel(CLIPConfig(**tiny_clip_config()))
    model = get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES, tokenizer_name_or_path=clip_path))
    assert model(pixel_values=pixel_values).logits.shape == (4, 5)


@pytest.mark.parametrize(
    "shape, field",
    [
        ({"vision_width": 64}, "vision_hidden_size: adapter 48, model 64"),
        ({"vision_layers": 4}, "vision_num_layers: adapter 3, model 4"),
        ({"text_width": 48}, "text_hidden_size: adapter 32, model 48"),
    ],
)
def test_adapter_into_a_clip_of_another_shape(clip, tmp_path, shape, field):
    get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES)).save_pretrained(tmp_path / "adapter")
    other = CLIPModel.from_pretrained(save_tiny_clip(tmp_path / "other", **shape))
    with pytest.raises(ValueError, match=f"another shape .*{field}"):
        PeftModel.from_pretrained(other, tmp_path / "adapter")
    assert is_untouched(other)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_adapter_file(clip_path, tmp_path, damage):
    get_peft_model(CLIPModel.from_pretrained(clip_path), DPTConfig(class_names=CLASS_NAMES)).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    clip = CLIPModel.from_pretrained(clip_path)
    with pytest.raises(ValueError, match="Could not load the DPT adapter .*truncated or corrupt"):
        PeftModel.from_pretrained(clip, tmp_path)
    assert is_untouched(clip)


def test_adapter_file_missing_tensors(clip_path, tmp_path):
    from safetensors.torch import load_file, save_file

    model = get_peft_model(CLIPModel.from_pretrained(clip_path), DPTConfig(class_names=CLASS_NAMES))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors.pop(next(k for k in tensors if "dpt_context" in k))
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model.add_adapter("other", DPTConfig(class_names=["bird", "fish"]))
    with pytest.raises(ValueError, match="does not match its config: missing .*dpt_context"):
        model.load_adapter(tmp_path, "partial")
    assert set(model.peft_config) == {"default", "other"}


def test_unknown_adapter_name(clip):
    model = get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES))
    with pytest.raises(ValueError, match=r"Adapter nope not found; the adapters are \['default'\]"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match=r"Adapter nope does not exist; the adapters are \['default'\]"):
        model.delete_adapter("nope")


def test_forward_input_errors(clip, pixel_values):
    model = get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES))
    with pytest.raises(ValueError, match="takes no input_ids.*disable_adapter"):
        model(input_ids=torch.tensor([[1, 2]]), pixel_values=pixel_values)
    with pytest.raises(ValueError, match="pixel_values is required"):
        model()
    with pytest.raises(TypeError, match=r"Unexpected argument\(s\) \['label'\]"):
        model(pixel_values=pixel_values, label=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"Unknown task 'b'.*\['default'\]"):
        model(pixel_values=pixel_values, task="b")


def test_class_aware_vision_tower_called_directly(clip, pixel_values):
    model = get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES))
    with pytest.raises(RuntimeError, match="class-aware prompts.*call the PEFT model itself"):
        model.get_image_features(pixel_values=pixel_values)


def test_set_class_names_errors_leave_the_label_space_unchanged(clip):
    model = get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES, class_specific_context=True, num_text_tokens=2))
    with pytest.raises(ValueError, match="one context per class for 5 classes; it cannot serve 2"):
        model.set_class_names(["bird", "fish"])
    assert model.peft_config["default"].class_names == CLASS_NAMES
    assert model.class_names() == CLASS_NAMES


def test_a_failed_application_records_no_model_shape(clip, tmp_path):
    config = DPTConfig(class_names=CLASS_NAMES, visual_depth=4)
    with pytest.raises(ValueError, match="visual_depth=4"):
        get_peft_model(clip, config)
    assert config.vision_hidden_size is None and config.vision_num_layers is None
    reused = DPTConfig(class_names=CLASS_NAMES)
    get_peft_model(clip, reused)
    other = CLIPModel.from_pretrained(save_tiny_clip(tmp_path / "wide", vision_width=64))
    with pytest.raises(ValueError, match="create a new DPTConfig"), pytest.warns(UserWarning, match="renamed"):
        get_peft_model(other, reused)


def test_repeated_class_names_are_allowed_with_a_warning_and_told_apart_in_reports(clip):
    """CLIP's ImageNet list names "missile" and "sunglasses" twice; labels are indices, so the adapter serves it."""
    from dpt_peft.class_names import display_names

    names = ["missile", "cat", "missile", "Sea_turtle", "sea turtle"]
    with pytest.warns(UserWarning, match=r"2 class\(es\) more than once \('missile' and 'missile'; 'Sea_turtle' and"):
        model = get_peft_model(clip, DPTConfig(class_names=names, num_text_tokens=2))
    assert model.class_names() == names
    assert display_names(names) == ["missile", "cat", "missile (2)", "Sea_turtle", "sea turtle (2)"]


def test_nfc_and_nfd_spellings_are_one_name():
    from dpt_peft.class_names import normalize_class_name

    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert composed != decomposed and normalize_class_name(composed) == normalize_class_name(decomposed)
    with pytest.warns(UserWarning, match="more than once"):
        DPTConfig(class_names=[composed, decomposed])


def test_a_first_python_call_on_the_toy_clip_takes_the_defaults_that_fit_it():
    """Issue 32 item 10: DPTConfig's default 16 context tokens cannot fit the toy CLIP's 16 positions; on a shipped
    model a field left at its default takes the model's fitting value, as the CLI does. A value given is kept."""
    from dpt_peft.sources import load_base_model

    model = get_peft_model(load_base_model(), DPTConfig(class_names=["circle", "square"]))
    assert model.peft_config["default"].num_text_tokens == 4
    given = get_peft_model(load_base_model(), DPTConfig(class_names=["circle", "square"], num_text_tokens=3))
    assert given.peft_config["default"].num_text_tokens == 3
