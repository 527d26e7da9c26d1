"""PEFT's own generic tests, ported onto DPT on a tiny CLIPModel.

The originals are in the sdist of the installed peft (0.21.2: `pip download --no-deps --no-binary :all: peft==0.21.2`):
`tests/testing_common.py` (`PeftCommonTester._test_*`, called by `tests/test_custom_models.py`'s
`TestPeftCustomModel.test_*`), `tests/test_custom_models.py` itself and `tests/test_config.py` (`TestPeftConfig`).
Each test below names its original in its docstring and follows it line by line, with three kinds of change, each
said where it is made:

- DPT's forward classifies images over its class names: where PEFT feeds the base model's inputs to the PEFT model, a
  DPT model gets `pixel_values` (and `labels`), and the base CLIP gets CLIP's own inputs (`input_ids` of the zero-shot
  prompts and `pixel_values`, `clip_inputs`), whose image-text logits are then the frozen model's class logits.
- PEFT's tests load from a Hub id; here the base model is a local folder, which DPT's card does not name as a Hub
  `base_model` (one test gives the base a Hub-like name to check that branch).
- What DPT refuses on purpose is asserted as a refusal: pickled adapters (`safe_serialization=False`), merging, direct
  injection (a tuner with shared state), `modules_to_save`.

The checks that do not apply to a prompt method on CLIP are left out: merging (refused), `layers_to_transform`,
`target_modules`, mixed adapter batches, weighted adapters, conversion to LoRA, generation, Hub downloads.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import tempfile
import warnings
from operator import attrgetter

import pytest
import torch
import yaml
from helpers import CLASS_NAMES
from peft import (
    PeftConfig,
    PeftModel,
    get_base_model_state_dict,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_base_model_state_dict,
)
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import _get_submodules
from safetensors.torch import load_file
from transformers import CLIPModel

from dpt_peft import DPTConfig
from dpt_peft.utils.write_policy import plain_file_mode

CLASSES = CLASS_NAMES[:4]
# PEFT's TEST_CASES for one method: (test_name, config_kwargs). Each case has prompts of its own kinds, so that every
# wrapped layer type (text embeddings, vision layers with deep and with class-aware prompts) is exercised.
TEST_CASES = [
    ("DPT", {"class_names": CLASSES, "num_text_tokens": 4, "num_visual_tokens": 2, "class_aware_top_k": 2}),
    ("CoOp", {"class_names": CLASSES, "num_text_tokens": 4, "num_visual_tokens": 0, "class_aware": False}),
    ("VPT", {"class_names": CLASSES, "learn_text_context": False, "num_visual_tokens": 2, "class_aware": False}),
]
CASE_IDS = [name for name, _ in TEST_CASES]
cases = pytest.mark.parametrize("config_kwargs", [kwargs for _, kwargs in TEST_CASES], ids=CASE_IDS)
# What PEFT's test_config.py passes to each config class (`ALL_CONFIG_CLASSES`' mandatory kwargs).
MANDATORY_KWARGS = {"class_names": CLASSES}


def prepare_inputs_for_testing() -> dict[str, torch.Tensor]:
    """PeftCommonTester.prepare_inputs_for_testing: what the PEFT (DPT) model takes."""
    pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return {"pixel_values": pixel_values, "labels": torch.tensor([0, 1, 2, 3])}


def clip_inputs(model_id: str) -> dict[str, torch.Tensor]:
    """The base CLIP's own inputs: the zero-shot prompts of the classes and the same images."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_id)
    texts = [DPTConfig(class_names=CLASSES).zero_shot_template.format(name) for name in CLASSES]
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    return {**tokens, "pixel_values": prepare_inputs_for_testing()["pixel_values"]}


def from_pretrained(model_id: str, **kwargs) -> CLIPModel:
    return CLIPModel.from_pretrained(model_id, **kwargs).eval()


def make_config(model_id: str, config_kwargs: dict) -> DPTConfig:
    return DPTConfig(base_model_name_or_path=model_id, **copy.deepcopy(config_kwargs))


def get_state_dict(model, unwrap_compiled=True):
    """tests/testing_utils.py get_state_dict."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    return model.state_dict()


def check_modelcard(tmp_dirname, model):
    """PeftCommonTester.check_modelcard; DPT's card names a Hub id as `base_model`, never a local path (as PEFT's card
    for a model without a name has none)."""
    filename = os.path.join(tmp_dirname, "README.md")
    assert os.path.exists(filename)
    with open(filename, encoding="utf-8") as f:
        readme = f.read()
    metainfo = re.search(r"---\n(.*?)\n---", readme, re.DOTALL).group(1)
    dct = yaml.safe_load(metainfo)
    assert dct["library_name"] == "peft"
    name_or_path = model.config.to_dict()["_name_or_path"]
    if os.path.isdir(name_or_path):
        assert "base_model" not in dct
    else:
        assert dct["base_model"] == name_or_path


def check_config_json(tmp_dirname, model):
    """PeftCommonTester.check_config_json."""
    filename = os.path.join(tmp_dirname, "adapter_config.json")
    assert os.path.exists(filename)
    with open(filename, encoding="utf-8") as f:
        config = json.load(f)
    assert config["base_model_name_or_path"] == model.config.to_dict()["_name_or_path"]


# ---------------------------------------------------------------- PeftCommonTester (via TestPeftCustomModel)
@cases
def test_attributes_parametrized(clip_path, config_kwargs):
    """PEFT: PeftCommonTester._test_model_attr (TestPeftCustomModel.test_attributes_parametrized)."""
    model = get_peft_model(from_pretrained(clip_path), make_config(clip_path, config_kwargs))
    assert hasattr(model, "save_pretrained")
    assert hasattr(model, "from_pretrained")
    assert hasattr(model, "push_to_hub")


@cases
def test_adapter_name(clip_path, config_kwargs):
    """PEFT: PeftCommonTester._test_adapter_name (TestPeftCustomModel.test_adapter_name)."""
    config = make_config(clip_path, config_kwargs)
    model = get_peft_model(from_pretrained(clip_path), config, adapter_name="test-adapter")
    assert any("test-adapter" in n for n, _ in model.named_parameters())


@cases
def test_save_pretrained(clip_path, config_kwargs):
    """PEFT: PeftCommonTester._test_save_pretrained (TestPeftCustomModel.test_save_pretrained)."""
    model = get_peft_model(from_pretrained(clip_path), make_config(clip_path, config_kwargs))
    with tempfile.TemporaryDirectory() as tmp_dirname:
        model.save_pretrained(tmp_dirname)
        model_from_pretrained = from_pretrained(clip_path)
        with warnings.catch_warnings(record=True) as recs:
            warnings.simplefilter("always")
            model_from_pretrained = PeftModel.from_pretrained(model_from_pretrained, tmp_dirname)
            assert not any("Found missing adapter keys" in str(rec.message) for rec in recs)
        state_dict = get_state_dict(model)
        state_dict_from_pretrained = get_state_dict(model_from_pretrained)
        for key in state_dict.keys():
            assert torch.allclose(state_dict[key], state_dict_from_pretrained[key])
        assert os.path.exists(os.path.join(tmp_dirname, "adapter_model.safetensors"))
        assert os.path.exists(os.path.join(tmp_dirname, "adapter_config.json"))
        assert not os.path.exists(os.path.join(tmp_dirname, "model.safetensors"))
        assert not os.path.exists(os.path.join(tmp_dirname, "config.json"))
        check_modelcard(tmp_dirname, model)
        check_config_json(tmp_dirname, model)


def test_save_pretrained_pickle_is_refused_before_anything_is_written(clip_path, tmp_path):
    """PEFT: TestPeftCustomModel.test_save_pretrained_pickle (`_test_save_pretrained(safe_serialization=False)`),
    which expects adapter_model.bin: dpt_peft never loads a pickle, so writing one is refused with the fix."""
    model = get_peft_model(from_pretrained(clip_path), make_config(clip_path, TEST_CASES[0][1]))
    with pytest.raises(ValueError, match=r"safe_serialization=False would write adapter_model\.bin, a pickle"):
        model.save_pretrained(tmp_path / "adapter", safe_serialization=False)
    assert not (tmp_path / "adapter").exists()


def test_the_saved_weights_get_the_mode_a_plain_open_gives(clip_path, tmp_path):
    """Issue 32, item 15 for `save_pretrained` (no PEFT original): safetensors writes through a temporary file made
    0600, which a team sharing the folder could not read; the weights get the config's mode, for every adapter."""
    model = get_peft_model(from_pretrained(clip_path), make_config(clip_path, TEST_CASES[0][1]))
    model.add_adapter("other", make_config(clip_path, TEST_CASES[1][1]))
    old_umask = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path)
    finally:
        os.umask(old_umask)
    for folder in (tmp_path, tmp_path / "other"):
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert (folder / name).stat().st_mode & 0o777 == 0o644
    assert plain_file_mode() == 0o666 & ~old_umask


@cases
def test_save_pretrained_selected_adapters(clip_path, config_kwargs):
    """PEFT: PeftCommonTester._test_save_pretrained_selected_adapters
    (TestPeftCustomModel.test_save_pretrained_selected_adapters)."""
    model = get_peft_model(from_pretrained(clip_path), make_config(clip_path, config_kwargs))
    model.add_adapter("new_adapter", make_config(clip_path, config_kwargs))
    with tempfile.TemporaryDirectory() as tmp_dirname:
        model.save_pretrained(tmp_dirname)
        model_from_pretrained = PeftModel.from_pretrained(from_pretrained(clip_path), tmp_dirname)
        new_adapter_dir = os.path.join(tmp_dirname, "new_adapter")
        model_from_pretrained.load_adapter(new_adapter_dir, "new_adapter")
        state_dict = get_state_dict(model)
        state_dict_from_pretrained = get_state_dict(model_from_pretrained)
        assert state_dict.keys() == state_dict_from_pretrained.keys()
        for key in state_dict.keys():
            assert torch.allclose(state_dict[key], state_dict_from_pretrained[key])
        for folder in (tmp_dirname, new_adapter_dir):
            assert os.path.exists(os.path.join(folder, "adapter_model.safetensors"))
            assert os.path.exists(os.path.join(folder, "adapter_config.json"))
            assert not os.path.exists(os.path.join(folder, "model.safetensors"))
            assert not os.path.exists(os.path.join(folder, "config.json"))
        check_modelcard(tmp_dirname, model)
        check_config_json(tmp_dirname, model)

    with tempfile.TemporaryDirectory() as tmp_dirname:
        model.save_pretrained(tmp_dirname, selected_adapters=["default"])
        model_from_pretrained = PeftModel.from_pretrained(from_pretrained(clip_path), tmp_dirname)
        assert "default" in model_from_pretrained.peft_config.keys()
        assert "new_adapter" not in model_from_pretrained.peft_config.keys()


@cases
def test_save_pretrained_adapter_name_substring(clip_path, config_kwargs):
    """PEFT: PeftCommonTester._test_save_pretrained_adapter_name_substring
    (TestPeftCustomModel.test_save_pretrained_adapter_name_substring)."""
    config = make_config(clip_path, config_kwargs)
    model = get_peft_model(from_pretrained(clip_path), config)
    expected_number_of_weights = len(get_peft_model_state_dict(model))
    for name in ("default2", "other_default", "foodefault_bar", "efaul"):
        model.add_adapter(name, make_config(clip_path, config_kwargs))
    with tempfile.TemporaryDirectory() as tmp_dirname:
        model.save_pretrained(tmp_dirname, selected_adapters=["default"])
        state_dict = load_file(os.path.join(tmp_dirname, "adapter_model.safetensors"))
        assert len(state_dict) == expected_number_of_weights


@cases
def test_load_model_low_cpu_mem_usage(clip_path, config_kwargs, tmp_path):
    """PEFT: PeftCommonTester._test_load_model_low_cpu_mem_usage (TestPeftCustomModel.
    test_load_model_low_cpu_mem_usage); DPT is a tuner with shared state, so the direct injection at its end is
    refused, as PEFT's test expects."""
    config = make_config(clip_path, config_kwargs)
    model = get_peft_model(from_pretrained(clip_path), config)
    model.save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(from_pretrained(clip_path), tmp_path, torch_device="cpu", low_cpu_mem_usage=True)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    model.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=True)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with pytest.raises(ValueError, match="shared state.*get_peft_model"):
        inject_adapter_in_model(config, from_pretrained(clip_path), low_cpu_mem_usage=True)


def test_save_load_roundtrip_direct_injection(clip_path):
    """PEFT: TestPeftCustomModel.test_save_load_roundtrip_direct_injection: shared-state tuners must reject direct
    injection (the test returns there)."""
    config = make_config(clip_path, TEST_CASES[0][1])
    with pytest.raises(ValueError) as error:
        inject_adapter_in_model(config, from_pretrained(clip_path))
    assert "shared state" in str(error.value) and "get_peft_model" in str(error.value)


@cases
def test_from_pretrained_config_construction(clip_path, config_kwargs, tmp_path):
    """PEFT: PeftCommonTester._test_from_pretrained_config_construction
    (TestPeftCustomModel.test_from_pretrained_config_construction)."""
    config = make_config(clip_path, config_kwargs)
    model = get_peft_model(from_pretrained(clip_path), config)
    model.save_pretrained(tmp_path)
    model_from_pretrained = PeftModel.from_pretrained(
        from_pretrained(clip_path), tmp_path, is_trainable=False, config=config
    )
    assert model_from_pretrained.peft_config["default"].inference_mode
    assert model_from_pretrained.peft_config["default"] is config


@cases
def test_load_multiple_adapters(clip_path, config_kwargs, tmp_path):
    """PEFT: PeftCommonTester._test_load_multiple_adapters (TestPeftCustomModel.test_load_multiple_adapters)."""
    model = get_peft_model(from_pretrained(clip_path), make_config(clip_path, config_kwargs))
    model.save_pretrained(tmp_path)
    del model
    model = PeftModel.from_pretrained(from_pretrained(clip_path), tmp_path, torch_device="cpu")
    load_result1 = model.load_adapter(tmp_path, adapter_name="other")
    load_result2 = model.load_adapter(tmp_path, adapter_name="yet-another")
    assert load_result1.missing_keys == []
    assert load_result2.missing_keys == []


@cases
def test_training_custom_models(clip_path, config_kwargs):
    """PEFT: PeftCommonTester._test_training (TestPeftCustomModel.test_training_custom_models): only the adapter's
    parameters get gradients (with labels, so that the class-aware classifier's auxiliary loss reaches it)."""
    model = get_peft_model(from_pretrained(clip_path), make_config(clip_path, config_kwargs))
    output = model(**prepare_inputs_for_testing())[0]
    loss = output.sum()
    loss.backward()
    for n, param in model.named_parameters():
        if model.prefix in n:
            if param.requires_grad:
                assert param.grad is not None, n
            else:
                assert param.grad is None, n
        else:
            assert param.grad is None, n


@cases
def test_inference_safetensors(clip_path, config_kwargs, tmp_path):
    """PEFT: PeftCommonTester._test_inference_safetensors (TestPeftCustomModel.test_inference_safetensors); with
    labels DPT's output [0] is the loss, so the logits are read by name."""
    model = get_peft_model(from_pretrained(clip_path), make_config(clip_path, config_kwargs))
    inputs = prepare_inputs_for_testing()
    output = model(**inputs)
    output.loss.backward()
    model.eval()
    logits = model(**inputs).logits[0]
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert "adapter_model.safetensors" in os.listdir(tmp_path)
    assert "adapter_model.bin" not in os.listdir(tmp_path)
    model_from_pretrained = PeftModel.from_pretrained(from_pretrained(clip_path), tmp_path)
    logits_from_pretrained = model_from_pretrained(**inputs).logits[0]
    assert torch.allclose(logits, logits_from_pretrained, atol=1e-4, rtol=1e-4)


@cases
def test_training_gradient_checkpointing(clip_path, config_kwargs):
    """PEFT: PeftCommonTester._test_training_gradient_checkpointing (use_reentrant=True, as PEFT's default)."""
    model = from_pretrained(clip_path)
    assert getattr(model, "supports_gradient_checkpointing", False)
    model = get_peft_model(model, make_config(clip_path, config_kwargs))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    model.train(True)
    inputs = prepare_inputs_for_testing()

    def get_grads():
        for _, param in params:
            param.grad = None
        output = model(**inputs)[0] ** 2
        output.sum().backward()
        return {n: 0.0 if p.grad is None else p.grad.abs().sum().item() for n, p in params}

    grads_normal = get_grads()
    model.prepare_model_for_gradient_checkpointing(model)
    model.gradient_checkpointing_enable({"use_reentrant": True})
    grads_checkpointing = get_grads()
    all_grads = [*grads_normal.values(), *grads_checkpointing.values()]
    threshold = sum(all_grads) / len(all_grads) * 1e-6
    for n in grads_normal:
        if grads_normal[n] > threshold:
            assert grads_checkpointing[n] > 0, n
        if grads_checkpointing[n] > threshold:
            assert grads_normal[n] > 0, n
    for n, param in model.named_parameters():
        if model.prefix in n:
            assert param.grad is not None, n
        else:
            assert param.grad is None, n


@cases
def test_peft_model_device_map(clip_path, config_kwargs, tmp_path):
    """PEFT: PeftCommonTester._test_peft_model_device_map (TestPeftCustomModel.test_peft_model_device_map)."""
    model = get_peft_model(from_pretrained(clip_path), make_config(clip_path, config_kwargs))
    model.save_pretrained(tmp_path)
    PeftModel.from_pretrained(from_pretrained(clip_path), tmp_path, device_map={"": "cpu"})


@cases
@pytest.mark.parametrize("activate", [True, False], ids=["active", "inactive"])
def test_delete_adapter(clip_path, config_kwargs, activate):
    """PEFT: PeftCommonTester._test_delete_adapter and _test_delete_inactive_adapter (TestPeftCustomModel.
    test_delete_adapter, test_delete_inactive_adapter); the base model is called with CLIP's own inputs."""
    config = make_config(clip_path, config_kwargs)
    adapter_to_delete = "delete_me"
    model = get_peft_model(from_pretrained(clip_path), config)
    model.add_adapter(adapter_to_delete, make_config(clip_path, config_kwargs))
    if activate:
        model.set_adapter(adapter_to_delete)
    model.delete_adapter(adapter_to_delete)
    assert adapter_to_delete not in model.peft_config
    assert model.active_adapters == ["default"]
    for key in [key for key, _ in model.named_modules()]:
        _, target, _ = _get_submodules(model, key)
        for attr in getattr(target, "adapter_layer_names", []) + getattr(target, "other_param_names", []):
            assert adapter_to_delete not in attrgetter(attr)(target)
    model.delete_adapter("default")
    assert "default" not in model.peft_config
    assert model.active_adapters == []
    model.base_model(**clip_inputs(clip_path))  # should not raise an error


@cases
def test_delete_unknown_adapter_raises(clip_path, config_kwargs):
    """PEFT: PeftCommonTester._test_delete_unknown_adapter_raises: PEFT's words, then the adapters there are."""
    model = get_peft_model(from_pretrained(clip_path), make_config(clip_path, config_kwargs))
    with pytest.raises(ValueError, match="Adapter unknown-adapter does not exist; the adapters are"):
        model.delete_adapter("unknown-adapter")
    with pytest.raises(ValueError, match="Adapter unknown-adapter not found; the adapters are"):
        model.set_adapter("unknown-adapter")  # PeftModel.set_adapter's words


@cases
def test_unload_adapter(clip_path, config_kwargs):
    """PEFT: PeftCommonTester._test_unload_adapter. DPTConfig is no PromptLearningConfig: DPT unloads, as PEFT's other
    tuners, and the unloaded CLIP carries no `peft_config` (so wrapping it again does not warn "Already found a
    `peft_config` attribute"). The adapter's logits are over the classes, the base model's over the same prompts."""
    model = from_pretrained(clip_path)
    num_params_base = len(model.state_dict())
    base_inputs = clip_inputs(clip_path)
    with torch.inference_mode():
        logits_transformers = model(**base_inputs)[0]
    config = make_config(clip_path, config_kwargs)
    model = get_peft_model(model, config)
    with torch.inference_mode():
        logits_with_adapter = model(**prepare_inputs_for_testing()).logits
    model.eval()
    model = model.unload()
    num_params_unloaded = len(model.state_dict())
    with torch.inference_mode():
        logits_unload = model(**base_inputs)[0]
    assert not any(isinstance(module, BaseTunerLayer) for module in model.modules())
    assert not hasattr(model, "peft_config")
    assert not torch.allclose(logits_with_adapter, logits_unload, atol=1e-10, rtol=1e-10)
    assert torch.allclose(logits_transformers, logits_unload, atol=1e-4, rtol=1e-4)
    assert num_params_base == num_params_unloaded
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "Already found a `peft_config`")
        get_peft_model(model, make_config(clip_path, config_kwargs))


@cases
def test_disable_adapter(clip_path, config_kwargs):
    """PEFT: PeftCommonTester._test_disable_adapter (and TestPeftCustomModel.test_disable_adapters). Disabled, the
    PEFT model is CLIP, called with CLIP's inputs; enabled, DPT's class logits differ from the frozen model's
    (`output_zero_shot_logits`, the same images over the same classes)."""
    model = from_pretrained(clip_path)
    base_inputs, inputs = clip_inputs(clip_path), {"pixel_values": prepare_inputs_for_testing()["pixel_values"]}
    output_before = model(**base_inputs).logits_per_image
    peft_model = get_peft_model(model, make_config(clip_path, config_kwargs)).eval()  # no training-mode warning
    output_peft = peft_model(**inputs, output_zero_shot_logits=True)
    assert not torch.allclose(output_peft.zero_shot_logits, output_peft.logits)
    atol, rtol = 1e-6, 1e-6
    with peft_model.disable_adapter():
        output_peft_disabled = peft_model(**base_inputs).logits_per_image
    assert torch.allclose(output_before, output_peft_disabled, atol=atol, rtol=rtol)
    output_peft_after_disabled = peft_model(**inputs).logits
    assert torch.allclose(output_peft.logits, output_peft_after_disabled, atol=atol, rtol=rtol)


@cases
def test_get_base_model_state_dict(clip_path, config_kwargs):
    """PEFT: PeftCommonTester._test_get_base_model_state_dict (TestPeftCustomModel.test_get_base_model_state_dict)."""
    model = from_pretrained(clip_path)
    base_model_keys = set(model.state_dict().keys())
    original_state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, make_config(clip_path, config_kwargs))
    extracted_state_dict = get_base_model_state_dict(peft_model)
    assert set(extracted_state_dict.keys()) == base_model_keys
    for key in original_state_dict:
        assert torch.allclose(original_state_dict[key], extracted_state_dict[key]), key
    with torch.no_grad():
        for param in peft_model.get_base_model().parameters():
            if param.is_floating_point():
                param.add_(torch.randn_like(param) * 0.1)
    result = set_base_model_state_dict(peft_model, original_state_dict, strict=False)
    assert not result.missing_keys
    assert not result.unexpected_keys
    restored_state_dict = get_base_model_state_dict(peft_model)
    for key in original_state_dict:
        assert torch.allclose(original_state_dict[key], restored_state_dict[key]), key


# ---------------------------------------------------------------- TestPeftCustomModel's own tests
@cases
def test_forward_output_finite(clip_path, config_kwargs):
    """PEFT: TestPeftCustomModel.test_forward_output_finite."""
    model = get_peft_model(from_pretrained(clip_path), make_config(clip_path, config_kwargs)).eval()
    with torch.no_grad():
        output = model(**prepare_inputs_for_testing())
    assert torch.isfinite(output.logits).all() and torch.isfinite(output.loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_float16_and_bfloat16(clip_path, dtype):
    """PEFT: TestPeftCustomModel.test_forward_float16 and test_forward_bfloat16 (a base model in half precision must
    not make the forward fail; the merge half of the originals is refused for DPT)."""
    model = from_pretrained(clip_path, dtype=dtype)
    model = get_peft_model(model, make_config(clip_path, TEST_CASES[0][1])).eval()
    inputs = prepare_inputs_for_testing()
    logits = model(pixel_values=inputs["pixel_values"].to(dtype)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_adapter_dtype_autocast(clip_path, tmp_path, autocast_adapter_dtype, low_cpu_mem_usage):
    """PEFT: TestPeftCustomModel.test_adapter_dtype_autocast (bfloat16)."""
    dtype = torch.bfloat16
    expected_dtype = torch.float32 if autocast_adapter_dtype else dtype
    config = make_config(clip_path, TEST_CASES[0][1])
    model = get_peft_model(
        from_pretrained(clip_path, dtype=dtype), config, autocast_adapter_dtype=autocast_adapter_dtype
    )
    model.add_adapter("other", make_config(clip_path, TEST_CASES[0][1]), autocast_adapter_dtype=autocast_adapter_dtype)
    peft_params = [p for n, p in model.named_parameters() if model.prefix in n]
    assert peft_params and all(p.dtype == expected_dtype for p in peft_params)
    model.save_pretrained(tmp_path)
    del model
    model = PeftModel.from_pretrained(
        from_pretrained(clip_path, dtype=dtype),
        tmp_path,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )
    model.load_adapter(
        tmp_path / "other",
        adapter_name="other",
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )
    peft_params = [p for n, p in model.named_parameters() if model.prefix in n]
    assert all(p.dtype == expected_dtype for p in peft_params)


def train_three_sgd_steps(model) -> None:
    """PEFT's training in these tests: SGD at lr 0.5, 3 steps on the same inputs."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    inputs = prepare_inputs_for_testing()
    for _ in range(3):
        optimizer.zero_grad()
        model(**inputs).loss.backward()
        optimizer.step()


@cases
def test_only_params_are_updated(clip_path, config_kwargs):
    """PEFT: TestPeftCustomModel.test_only_params_are_updated (SGD, lr 0.5, 3 steps)."""
    model = get_peft_model(from_pretrained(clip_path), make_config(clip_path, config_kwargs))
    model_before = copy.deepcopy(model)
    train_three_sgd_steps(model)
    tol = 1e-4
    params_before = dict(model_before.named_parameters())
    params_after = dict(model.named_parameters())
    assert params_before.keys() == params_after.keys()
    for name, param_before in params_before.items():
        param_after = params_after[name]
        if model.prefix in name:
            assert not torch.allclose(param_before, param_after, atol=tol, rtol=tol), name
        else:
            assert torch.allclose(param_before, param_after, atol=tol, rtol=tol), name


@cases
def test_save_load_roundtrip(clip_path, config_kwargs, tmp_path):
    """PEFT: TestPeftCustomModel.test_save_load_roundtrip (the sanity check compares with the frozen model's logits
    over the same classes)."""
    inputs = prepare_inputs_for_testing()
    torch.manual_seed(0)
    model = get_peft_model(from_pretrained(clip_path), make_config(clip_path, config_kwargs)).eval()
    with torch.inference_mode():
        output_before = model(**inputs, output_zero_shot_logits=True)
    atol, rtol = 1e-5, 1e-5
    assert not torch.allclose(output_before.zero_shot_logits, output_before.logits, atol=atol, rtol=rtol)
    model.save_pretrained(tmp_path)
    del model
    torch.manual_seed(54321)
    model = PeftModel.from_pretrained(from_pretrained(clip_path), tmp_path)
    with torch.inference_mode():
        output_after = model(**inputs)
    assert torch.allclose(output_before.logits, output_after.logits, atol=atol, rtol=rtol)


@cases
def test_parameters_after_loading_model(clip_path, config_kwargs, tmp_path):
    """PEFT: TestPeftCustomModel.test_parameters_after_loading_model (trained 3 SGD steps, then saved and loaded)."""
    model = get_peft_model(from_pretrained(clip_path), make_config(clip_path, config_kwargs))
    train_three_sgd_steps(model)
    params_before = get_state_dict(model)
    model.save_pretrained(tmp_path)
    params_after = get_state_dict(PeftModel.from_pretrained(from_pretrained(clip_path), tmp_path))
    assert params_before.keys() == params_after.keys()
    for name, param_before in params_before.items():
        assert torch.allclose(param_before, params_after[name], atol=1e-4, rtol=1e-4), name


@cases
def test_active_adapter(clip_path, config_kwargs):
    """PEFT: TestPeftCustomModel.test_active_adapter; two active DPT adapters are bookkept as PEFT's, and a forward
    then asks to choose one (prompts of two adapters are not defined together)."""
    model = get_peft_model(from_pretrained(clip_path), make_config(clip_path, config_kwargs))
    assert model.active_adapters == ["default"]
    assert model.active_adapter == "default"
    model.add_adapter("other", make_config(clip_path, config_kwargs))
    assert model.active_adapters == ["default"]
    assert model.active_adapter == "default"
    model.set_adapter("other")
    assert model.active_adapters == ["other"]
    assert model.active_adapter == "other"
    model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default", "other"]
    assert model.base_model.active_adapter == ["default", "other"]
    with pytest.raises(ValueError, match="one adapter at a time"):
        model(**prepare_inputs_for_testing())


def test_add_adapter_rejects_duplicate_name_without_mutation(clip_path):
    """PEFT: TestPeftCustomModel.test_add_adapter_rejects_duplicate_name_without_mutation."""
    config = make_config(clip_path, TEST_CASES[0][1])
    model = get_peft_model(from_pretrained(clip_path), config, adapter_name="existing")
    config_before = model.peft_config["existing"]
    state_dict_before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="Adapter with name 'existing' already exists"):
        model.add_adapter("existing", make_config(clip_path, TEST_CASES[1][1]))
    assert model.peft_config["existing"] is config_before
    state_dict_after = model.state_dict()
    assert state_dict_after.keys() == state_dict_before.keys()
    for key, value in state_dict_before.items():
        assert torch.equal(state_dict_after[key], value)


def test_disable_adapters_exiting_context_restores_previous_state_and_is_reentrant(clip_path):
    """PEFT: TestPeftCustomModel.test_disable_adapters_exiting_context_restores_previous_state,
    test_disable_adapter_is_reentrant and test_disable_adapters_exiting_context_irregular_state."""
    model = get_peft_model(from_pretrained(clip_path), make_config(clip_path, TEST_CASES[0][1]))
    tuner_modules = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    assert len(tuner_modules) >= 2
    assert all(not module.disable_adapters for module in tuner_modules)
    with model.disable_adapter():
        assert not model.has_active_enabled_adapter
        with model.disable_adapter():
            assert all(module.disable_adapters for module in tuner_modules)
        assert all(module.disable_adapters for module in tuner_modules)
        assert not model.has_active_enabled_adapter
    assert all(not module.disable_adapters for module in tuner_modules)
    assert model.has_active_enabled_adapter
    model.disable_adapter_layers()
    assert all(module.disable_adapters for module in tuner_modules)
    with model.disable_adapter():
        pass
    assert all(module.disable_adapters for module in tuner_modules)
    model.enable_adapter_layers()
    tuner_modules[0].enable_adapters(False)
    assert {module.disable_adapters for module in tuner_modules} == {True, False}
    msg = "The model contains some adapter layers that are enabled and others that are disabled"
    with pytest.warns(UserWarning, match=msg), model.disable_adapter():
        pass
    assert all(not module.disable_adapters for module in tuner_modules)


@cases
def test_delete_adapter_properly_cleans_up_after_itself(clip_path, config_kwargs):
    """PEFT: TestPeftCustomModel.test_delete_adapter_properly_cleans_up_after_itself."""
    model = get_peft_model(from_pretrained(clip_path), DPTConfig(**copy.deepcopy(config_kwargs)), adapter_name="foobar")

    def get_dict_like_attrs(obj):
        for attr_name in dir(obj):
            if attr_name.startswith("_"):
                continue
            try:
                attr = getattr(obj, attr_name)
            except (AttributeError, ValueError, RuntimeError):
                continue
            if callable(getattr(attr, "keys", None)) and hasattr(attr, "__getitem__") and hasattr(attr, "__contains__"):
                if "foobar" in attr:
                    yield attr_name, attr

    dict_attrs = list(get_dict_like_attrs(model))
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            dict_attrs.extend(get_dict_like_attrs(module))
    assert dict_attrs
    model.delete_adapter(adapter_name="foobar")
    assert not [attr_name for attr_name, attr in dict_attrs if "foobar" in attr]


def _check_requires_grad(module, adapter_name, requires_grad):
    """TestPeftCustomModel._check_requires_grad."""
    for name in module.adapter_layer_names:
        module_dict = getattr(module, name)
        if adapter_name not in module_dict:
            continue
        attr = module_dict[adapter_name]
        if isinstance(attr, torch.nn.Module):
            for param in attr.parameters():
                assert param.requires_grad == requires_grad
        else:
            assert attr.requires_grad == requires_grad


def test_set_requires_grad(clip_path):
    """PEFT: TestPeftCustomModel.test_set_requires_grad (adapter1 prompts more layers than adapter0)."""
    model = get_peft_model(
        from_pretrained(clip_path), make_config(clip_path, TEST_CASES[1][1]), adapter_name="adapter0"
    ).eval()
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        _check_requires_grad(layer, adapter_name="adapter0", requires_grad=True)
    model.add_adapter("adapter1", make_config(clip_path, TEST_CASES[0][1]))
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        _check_requires_grad(layer, adapter_name="adapter0", requires_grad=True)
        _check_requires_grad(layer, adapter_name="adapter1", requires_grad=False)
    model.set_requires_grad(adapter_names="adapter1")
    for layer in layers:
        _check_requires_grad(layer, adapter_name="adapter0", requires_grad=True)
        _check_requires_grad(layer, adapter_name="adapter1", requires_grad=True)
    model.set_requires_grad(adapter_names=["adapter0", "adapter1"], requires_grad=False)
    for layer in layers:
        _check_requires_grad(layer, adapter_name="adapter0", requires_grad=False)
        _check_requires_grad(layer, adapter_name="adapter1", requires_grad=False)


@pytest.mark.parametrize("is_trainable", [False, True])
def test_loading_model_requires_grad_set_correctly(clip_path, tmp_path, is_trainable):
    """PEFT: TestPeftCustomModel.test_loading_model_requires_grad_set_correctly."""
    config = make_config(clip_path, TEST_CASES[0][1])
    get_peft_model(from_pretrained(clip_path), config).save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(from_pretrained(clip_path), tmp_path, is_trainable=is_trainable)

    def check(trainable_adapters):
        for name, param in model.named_parameters():
            assert param.requires_grad == any(f".{adapter}" in name for adapter in trainable_adapters), name

    check(("default",) if is_trainable else ())
    model.load_adapter(tmp_path, adapter_name="other", is_trainable=is_trainable)
    check(("default", "other") if is_trainable else ())
    model.load_adapter(tmp_path, adapter_name="opposite", is_trainable=not is_trainable)
    expected_trainable_adapters = ("default", "other") if is_trainable else ("opposite",)
    check(expected_trainable_adapters)
    model.add_adapter(adapter_name="added", peft_config=make_config(clip_path, TEST_CASES[0][1]))
    check(expected_trainable_adapters)


def test_existing_model_card(clip_path):
    """PEFT: TestPeftCustomModel.test_existing_model_card: a card already in the folder is updated, not replaced; the
    base model's tags (transformers' `add_model_tags`) join the card's (PEFT's create_or_update_model_card); saving
    again replaces DPT's section instead of adding a second one."""
    base = from_pretrained(clip_path)
    base.add_model_tags(["my-base-tag"])
    model = get_peft_model(base, make_config(clip_path, TEST_CASES[0][1]))
    with tempfile.TemporaryDirectory() as tmp_dirname:
        text = "---\nmeta: hello\ntags:\n- mine\n---\nThis is a model card\n"
        with open(os.path.join(tmp_dirname, "README.md"), "w") as f:
            f.write(text)
        model.save_pretrained(tmp_dirname)
        model.save_pretrained(tmp_dirname)
        with open(os.path.join(tmp_dirname, "README.md")) as f:
            model_card = f.read()
    assert "library_name: peft" in model_card
    assert "meta: hello" in model_card
    assert "This is a model card" in model_card
    tags = yaml.safe_load(re.search(r"---\n(.*?)\n---", model_card, re.DOTALL).group(1))["tags"]
    assert {"mine", "my-base-tag", "dpt", "peft"} <= set(tags)
    assert model_card.count("# DPT adapter of") == 1


def test_non_existing_model_card(clip_path):
    """PEFT: TestPeftCustomModel.test_non_existing_model_card."""
    model = get_peft_model(from_pretrained(clip_path), make_config(clip_path, TEST_CASES[0][1]))
    with tempfile.TemporaryDirectory() as tmp_dirname:
        model.save_pretrained(tmp_dirname)
        with open(os.path.join(tmp_dirname, "README.md")) as f:
            model_card = f.read()
    assert "library_name: peft" in model_card
    assert len(model_card) > 1000


def test_card_names_a_hub_base_model(clip_path, tmp_path):
    """PeftCommonTester.check_modelcard's Hub branch: a base model known by a Hub id is the card's `base_model` and
    the config's `base_model_name_or_path` (the tokenizer comes from the local copy)."""
    base = from_pretrained(clip_path)
    base.config._name_or_path = base.name_or_path = "someone/tiny-clip"
    config = DPTConfig(tokenizer_name_or_path=clip_path, **TEST_CASES[0][1])
    model = get_peft_model(base, config)
    model.save_pretrained(tmp_path)
    check_modelcard(tmp_path, model)
    check_config_json(tmp_path, model)


def test_adapter_name_makes_no_difference(clip_path):
    """PEFT: TestPeftCustomModel.test_adapter_name_makes_no_difference."""
    inputs = {"pixel_values": prepare_inputs_for_testing()["pixel_values"]}
    outputs, state_dicts = {}, {}
    for name in ("default", "adapter", "other-name"):
        torch.manual_seed(0)
        model = get_peft_model(from_pretrained(clip_path), make_config(clip_path, TEST_CASES[0][1]), adapter_name=name)
        outputs[name] = model.eval()(**inputs, output_zero_shot_logits=True)
        state_dicts[name] = model.state_dict()
    sd_default = state_dicts["default"]
    assert len(sd_default) == len(state_dicts["adapter"]) == len(state_dicts["other-name"])
    for key in sd_default:
        for name in ("adapter", "other-name"):
            assert torch.allclose(sd_default[key], state_dicts[name][key.replace("default", name)])
    for output in outputs.values():
        assert not torch.allclose(output.zero_shot_logits, output.logits)
        assert torch.allclose(outputs["default"].logits, output.logits)


def test_modules_to_save_is_accepted_and_refused_by_name(clip_path):
    """PEFT's prompt-learning configs take `modules_to_save` (tests/test_custom_models.py's modules_to_save cases):
    DPTConfig takes the field (unset, saved as null) and refuses any module, naming the field and the fix."""
    assert DPTConfig(class_names=CLASSES, modules_to_save=None).modules_to_save is None
    assert DPTConfig(class_names=CLASSES).to_dict()["modules_to_save"] is None
    with pytest.raises(ValueError, match=r"modules_to_save=\['visual_projection'\]: DPT trains only prompts"):
        DPTConfig(class_names=CLASSES, modules_to_save=["visual_projection"])


# ---------------------------------------------------------------- TestPeftConfig (tests/test_config.py)
def test_config_methods():
    """PEFT: TestPeftConfig.test_methods and test_to_dict."""
    config = DPTConfig(**MANDATORY_KWARGS)
    for method in ("to_dict", "save_pretrained", "from_pretrained", "from_json_file"):
        assert hasattr(config, method)
    assert isinstance(config.to_dict(), dict)


@pytest.mark.parametrize("valid_task_type", ["DPT_CLASSIFICATION", None])
def test_valid_task_type(valid_task_type):
    """PEFT: TestPeftConfig.test_valid_task_type (DPT's task type, and None, which becomes it)."""
    assert DPTConfig(task_type=valid_task_type, **MANDATORY_KWARGS).task_type == "DPT_CLASSIFICATION"


def test_invalid_task_type():
    """PEFT: TestPeftConfig.test_invalid_task_type."""
    with pytest.raises(ValueError, match="Invalid task type: 'invalid-task-type'"):
        DPTConfig(task_type="invalid-task-type", **MANDATORY_KWARGS)


def test_from_peft_type():
    """PEFT: TestPeftConfig.test_from_peft_type, for DPT's peft type."""
    config = PeftConfig.from_peft_type(peft_type="DPT", **MANDATORY_KWARGS)
    assert type(config) is PEFT_TYPE_TO_CONFIG_MAPPING["DPT"] is DPTConfig


def test_config_save_pretrained_and_from_pretrained_without_weights(tmp_path):
    """PEFT: TestPeftConfig.test_save_pretrained and test_set_attributes: a folder with only adapter_config.json loads
    as a config (types and bounds still checked); loading it as an adapter is refused by name."""
    config = DPTConfig(peft_type="test", **MANDATORY_KWARGS)
    config.save_pretrained(tmp_path)
    assert DPTConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    assert PeftConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, "num_visual_tokens": -1}))
    with pytest.raises(ValueError, match="num_visual_tokens=-1 is negative"):
        DPTConfig.from_pretrained(tmp_path)


def test_a_config_alone_is_refused_as_an_adapter_before_weights_are_read(clip_path, tmp_path):
    """The other half of item 2: PeftModel.from_pretrained on a folder without weights names the missing file and
    gives the caller's CLIP back untouched."""
    config = make_config(clip_path, TEST_CASES[0][1])
    config.save_pretrained(tmp_path)
    clip = from_pretrained(clip_path)
    with pytest.raises(ValueError, match=r"holds no adapter_model\.safetensors, so there are no prompts to load"):
        PeftModel.from_pretrained(clip, tmp_path)
    assert not any(isinstance(module, BaseTunerLayer) for module in clip.modules())


def test_from_json_file(tmp_path):
    """PEFT: TestPeftConfig.test_from_json_file (a saved runtime_config is ignored)."""
    config = DPTConfig(**MANDATORY_KWARGS)
    config.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_from_json = DPTConfig.from_json_file(config_path)
    assert config.to_dict() == config_from_json
    config_from_json["runtime_config"] = {"ephemeral_gpu_offload": True}
    config_path.write_text(json.dumps(config_from_json))
    assert config.to_dict() == DPTConfig.from_json_file(config_path)


@pytest.mark.parametrize("copier", [copy.copy, copy.deepcopy, lambda c: pickle.loads(pickle.dumps(c))])
def test_config_copy_deepcopy_and_pickle_roundtrip(copier):
    """PEFT: TestPeftConfig.test_config_copy, test_config_deepcopy, test_config_pickle_roundtrip (a config object in
    memory, as PEFT's test; no file is unpickled)."""
    config = DPTConfig(**MANDATORY_KWARGS)
    assert config.to_dict() == copier(config).to_dict()


@pytest.mark.parametrize("loader", [DPTConfig, PeftConfig], ids=["DPTConfig", "PeftConfig"])
def test_from_pretrained_forward_compatible(tmp_path, recwarn, loader):
    """PEFT: TestPeftConfig.test_from_pretrained_forward_compatible and
    test_from_pretrained_forward_compatible_load_from_peft_config."""
    config = DPTConfig(**MANDATORY_KWARGS)
    config.save_pretrained(tmp_path)
    config_dict = json.loads((tmp_path / "adapter_config.json").read_text())
    config_dict["foobar"] = "baz"
    config_dict["spam"] = 123
    (tmp_path / "adapter_config.json").write_text(json.dumps(config_dict))
    msg = "Unexpected keyword arguments ['foobar', 'spam'] for class DPTConfig, these are ignored."
    config_from_pretrained = loader.from_pretrained(tmp_path)
    assert len(recwarn) == 1
    assert recwarn.list[-1].message.args[0].startswith(msg)
    assert "foo" not in config_from_pretrained.to_dict()
    assert "spam" not in config_from_pretrained.to_dict()
    assert config.to_dict() == config_from_pretrained.to_dict()
    assert isinstance(config_from_pretrained, DPTConfig)


def test_from_pretrained_sanity_check(tmp_path):
    """PEFT: TestPeftConfig.test_from_pretrained_sanity_check."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"foo": "bar", "baz": 123}))
    msg = "The DPTConfig config that is trying to be loaded is missing required keys: {'peft_type'}."
    with pytest.raises(TypeError, match=re.escape(msg)):
        DPTConfig.from_pretrained(tmp_path)


def test_peft_version_is_stored(monkeypatch, tmp_path):
    """PEFT: TestPeftConfig.test_peft_version_is_stored."""
    from peft import config as peft_config_module

    version = "0.10.0"
    monkeypatch.setattr(peft_config_module, "__version__", version)
    config = DPTConfig(**MANDATORY_KWARGS)
    assert config.peft_version == version
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_version"] == version
    monkeypatch.setattr(peft_config_module, "__version__", "0.1.another-version")
    assert PeftConfig.from_pretrained(tmp_path).peft_version == version
    assert DPTConfig.from_pretrained(tmp_path).peft_version == version
    assert PeftConfig.from_json_file(str(tmp_path / "adapter_config.json"))["peft_version"] == version
