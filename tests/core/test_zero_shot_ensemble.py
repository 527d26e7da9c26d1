"""The zero-shot ensemble in `classify` (issue 27, items 4 and 7): in eval mode the logits are the log of the mixed
class probabilities (weight 1: the adapter's, 0: zero-shot's, 0.5: a plain mix), on a tiny CLIP and a tiny SigLIP;
training and the loss are untouched; the weight is checked, recorded in the saved adapter, and optional on load."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModel

from dpt_peft import DPTConfig
from dpt_peft.utils.errors import UserInputError

CLASSES = ["cat", "dog", "red car", "sea_turtle", "tree"]


def adapted(path: str, method: str = "dpt", **config) -> PeftModel:
    torch.manual_seed(0)
    model = get_peft_model(AutoModel.from_pretrained(path), DPTConfig.for_method(method, class_names=CLASSES, **config))
    with torch.no_grad():  # prompts away from zero-shot, so that the two classifiers disagree
        for _, parameter in model.adapter_parameters().values():
            parameter.add_(torch.randn_like(parameter))
    return model.eval()


@pytest.mark.parametrize("method", ["coop", "dpt"])
def test_the_mixture_of_probabilities(base_path, pixel_values, method):
    model = adapted(base_path, method, num_text_tokens=4)
    with torch.no_grad():
        plain = model(pixel_values=pixel_values, output_zero_shot_logits=True)
        adapter, zero_shot = plain.logits.softmax(-1), plain.zero_shot_logits.softmax(-1)
        assert not torch.allclose(adapter, zero_shot, atol=1e-3)
        for weight in (1.0, 0.0, 0.5, 0.2):
            model.set_zero_shot_ensemble(weight)
            output = model(pixel_values=pixel_values)
            expected = weight * adapter + (1 - weight) * zero_shot
            torch.testing.assert_close(output.logits.softmax(-1), expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(output.logits.exp(), expected, rtol=1e-5, atol=1e-6)  # log-probabilities
            torch.testing.assert_close(output.zero_shot_logits, plain.zero_shot_logits)  # the plain zero-shot ones
    assert torch.equal(output.logits.argmax(-1), (0.2 * adapter + 0.8 * zero_shot).argmax(-1))


def test_training_and_the_loss_are_untouched(clip_path, pixel_values, labels):
    model = adapted(clip_path)
    plain = model(pixel_values=pixel_values, labels=labels)
    model.set_zero_shot_ensemble(0.5)
    mixed = model(pixel_values=pixel_values, labels=labels)
    assert torch.equal(mixed.loss, plain.loss)  # at inference too, the loss is the adapter's own
    assert not torch.allclose(mixed.logits, plain.logits)
    model.train()
    trained = model(pixel_values=pixel_values, labels=labels)
    assert torch.equal(trained.logits, plain.logits) and torch.equal(trained.loss, plain.loss)
    model.eval().set_zero_shot_ensemble(None)
    assert torch.equal(model(pixel_values=pixel_values).logits, plain.logits)


@pytest.mark.parametrize("weight", [1.5, -0.1, float("nan"), float("inf"), True, "0.5"])
def test_bad_weights_are_refused_naming_the_field(clip_path, weight):
    model = adapted(clip_path)
    with pytest.raises(UserInputError, match="zero_shot_ensemble="):
        model.set_zero_shot_ensemble(weight)
    with pytest.raises(UserInputError, match="zero_shot_ensemble="):
        DPTConfig(class_names=CLASSES, zero_shot_ensemble=weight)
    assert model.peft_config["default"].zero_shot_ensemble is None
    with pytest.raises(UserInputError, match="Adapter other not found"):
        model.set_zero_shot_ensemble(0.5, adapter_name="other")


def test_the_saved_adapter_records_the_weight_and_old_adapters_load(clip_path, pixel_values, tmp_path):
    model = adapted(clip_path)
    model.set_zero_shot_ensemble(0.25)
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    assert saved["zero_shot_ensemble"] == 0.25
    loaded = PeftModel.from_pretrained(AutoModel.from_pretrained(clip_path), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixel_values).logits, expected)
    for name in ("zero_shot_ensemble", "consistency_weights", "consistency_templates"):  # as 0.5.x saved them
        del saved[name]
    config_file.write_text(json.dumps(saved))
    old = PeftModel.from_pretrained(AutoModel.from_pretrained(clip_path), tmp_path)
    assert old.peft_config["default"].zero_shot_ensemble is None
    assert old.peft_config["default"].consistency_weights is None
