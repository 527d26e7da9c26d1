"""PromptSRC's self-consistency terms (issue 27, items 2 and 7): each term equals a plain re-computation from the base
model's own calls on a tiny CLIP and a tiny SigLIP; all three are zero where the adapter is still zero-shot CLIP; off
(None or zeros) is exactly DPT's loss and gradients; every method trains with them; bad weights are refused."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from siglip_helpers import TEXT_CONTEXT
from transformers import AutoModel, AutoTokenizer

from dpt_peft import DPTConfig
from dpt_peft.cli.train_args import parse_args
from dpt_peft.utils.errors import UserInputError

CLASSES = ["cat", "dog", "red car", "sea_turtle", "tree"]
TEMPLATES = ["a photo of a {}.", "a photo of the {}.", "the {}."]
WEIGHTS = (10.0, 25.0, 1.0)


def frozen_text(path: str, template: str) -> torch.Tensor:
    """The base model's own text features of `template` for every class (SigLIP padded to its context)."""
    model, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    texts = [template.format(name.replace("_", " ")) for name in CLASSES]
    padding = {"padding": "max_length", "max_length": TEXT_CONTEXT} if "siglip" in model.config.model_type else {}
    inputs = tokenizer(texts, return_tensors="pt", **({"padding": True} | padding))
    with torch.no_grad():
        return model.get_text_features(input_ids=inputs["input_ids"]).pooler_output


def frozen_image_and_logits(path: str, pixel_values: torch.Tensor, text: torch.Tensor):
    """The base model's image features and its logits against `text` (scaled cosine, plus SigLIP's bias)."""
    model = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixel_values).pooler_output
    logits = model.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    return image, logits + (model.logit_bias if hasattr(model, "logit_bias") else 0)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def adapted(path: str, method: str = "dpt", **config) -> PeftModel:
    torch.manual_seed(0)
    config = DPTConfig.for_method(method, class_names=CLASSES, num_text_tokens=4, **config)
    return get_peft_model(AutoModel.from_pretrained(path), config)


@pytest.mark.parametrize("templates", [None, TEMPLATES], ids=["zero_shot_template", "template_ensemble"])
def test_terms_equal_a_plain_recomputation(base_path, pixel_values, labels, templates):
    model = adapted(base_path, consistency_weights=WEIGHTS, consistency_templates=templates)
    output = model(pixel_values=pixel_values, labels=labels, output_text_embeds=True)
    target = torch.stack([frozen_text(base_path, t) for t in templates or ["a photo of a {}."]]).mean(dim=0)
    image, zero_shot_logits = frozen_image_and_logits(base_path, pixel_values, target)
    expected = {
        "consistency_image": 10 * (unit(output.image_embeds) - unit(image)).abs().mean(),
        "consistency_text": 25 * (unit(output.text_embeds) - unit(target)).abs().mean(),
        "consistency_logits": (  # KL(zero-shot || prompted), summed, over B * C
            zero_shot_logits.softmax(-1) * (zero_shot_logits.log_softmax(-1) - output.logits.log_softmax(-1))
        ).sum()
        / output.logits.numel(),
    }
    for name, value in expected.items():
        torch.testing.assert_close(output.loss_terms[name], value.detach(), rtol=1e-4, atol=1e-6)
    cross_entropy = F.cross_entropy(output.logits, labels)
    torch.testing.assert_close(output.loss_terms["cross_entropy"], cross_entropy.detach())
    assert output.loss_terms["class_aware"] == pytest.approx(0.3 * output.class_aware_loss.item(), rel=1e-6)
    torch.testing.assert_close(output.loss.detach(), sum(output.loss_terms.values()), rtol=1e-6, atol=1e-6)


def test_all_terms_are_zero_while_the_adapter_is_zero_shot(base_path, pixel_values, labels):
    """Context initialized from "a photo of a" and no visual prompts: the adapter is still the frozen model."""
    model = adapted(base_path, "coop", text_init="a photo of a", consistency_weights=WEIGHTS)
    terms = model(pixel_values=pixel_values, labels=labels).loss_terms
    for name, weight in zip(("consistency_image", "consistency_text", "consistency_logits"), WEIGHTS):
        assert float(terms[name]) / weight == pytest.approx(0.0, abs=1e-6), name  # float error of the text path


@pytest.mark.parametrize("off", [None, (0, 0, 0)])
@pytest.mark.parametrize("method", ["coop", "dpt"])
def test_off_is_exactly_dpts_loss_and_gradients(clip_path, pixel_values, labels, off, method):
    def loss_and_gradients(**config):
        model = adapted(clip_path, method, **config)
        output = model(pixel_values=pixel_values, labels=labels, guidance=method == "dpt")
        output.loss.backward()
        gradients = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return output, gradients

    today, today_gradients = loss_and_gradients()
    output, gradients = loss_and_gradients(consistency_weights=off)
    assert output.loss_terms is None and torch.equal(output.loss, today.loss)
    assert torch.equal(output.logits, today.logits)
    assert gradients.keys() == today_gradients.keys()
    assert all(torch.equal(gradients[n], today_gradients[n]) for n in gradients)


@pytest.mark.parametrize("method", ["coop", "vpt", "dpt"])
@pytest.mark.parametrize("guidance", [False, True])
def test_every_method_trains_with_them(clip_path, pixel_values, labels, method, guidance):
    model = adapted(clip_path, method, consistency_weights=(10, 0, 1))  # a zero weight leaves its term out
    output = model(pixel_values=pixel_values, labels=labels, guidance=guidance)
    output.loss.backward()
    main = "guidance" if guidance else "cross_entropy"
    assert {main, "consistency_image", "consistency_logits"} <= output.loss_terms.keys()
    assert "consistency_text" not in output.loss_terms
    assert all(not t.requires_grad and t.ndim == 0 for t in output.loss_terms.values())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)


def test_coop_reuses_its_own_image_pass_as_the_frozen_one(clip_path, pixel_values):
    """CoOp's image path has no prompts, so its pass is the frozen one: the zero-shot logits are exactly those of a
    separate frozen pass."""
    model = adapted(clip_path, "coop").eval()
    with torch.no_grad():
        output = model(pixel_values=pixel_values, output_zero_shot_logits=True)
        image, text = model.zero_shot_image_features(pixel_values), model.zero_shot_text_features()
    assert torch.equal(output.zero_shot_logits, model.backbone.logits(image, text))


def test_weights_are_recorded_in_the_saved_adapter(clip_path, pixel_values, labels, tmp_path):
    model = adapted(clip_path, consistency_weights=[10, 25, 1], consistency_templates=TEMPLATES)
    assert model.peft_config["default"].consistency_weights == WEIGHTS
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["consistency_weights"] == [10.0, 25.0, 1.0] and saved["consistency_templates"] == TEMPLATES
    loaded = PeftModel.from_pretrained(AutoModel.from_pretrained(clip_path), tmp_path)
    assert loaded.peft_config["default"].consistency_weights == WEIGHTS


@pytest.mark.parametrize(
    "weights", [(1, 2), (1, 2, 3, 4), (10, -1, 1), (10, float("nan"), 1), (True, 1, 1), "10 25 1", 5]
)
def test_bad_weights_are_refused_naming_the_field(weights):
    with pytest.raises(UserInputError, match="consistency_weights="):
        DPTConfig(class_names=CLASSES, consistency_weights=weights)


@pytest.mark.parametrize("templates", [[], ["a photo"], ["{} and {}"], [3]])
def test_bad_templates_are_refused_naming_the_field(templates):
    with pytest.raises(UserInputError, match="consistency_templates="):
        DPTConfig(class_names=CLASSES, consistency_templates=templates)


def test_the_train_flag_takes_three_weights():
    _, config = parse_args(["--consistency_weights", "10", "25", "1"])
    assert DPTConfig(class_names=CLASSES, **config).consistency_weights == WEIGHTS
    with pytest.raises(SystemExit):
        parse_args(["--consistency_weights", "10", "25"])


def test_a_template_longer_than_the_context_is_refused_naming_consistency_templates(clip_path, pixel_values, labels):
    too_long = "a photo of the " * 40 + "{}."
    model = adapted(clip_path, consistency_weights=WEIGHTS, consistency_templates=[too_long])
    with pytest.raises(UserInputError, match="shorten the class name or consistency_templates"):
        model(pixel_values=pixel_values, labels=labels)
