"""DPT on SigLIP (issue 22): exactness against SiglipModel's own logits on tiny random SigLIPs, the text path, the
adapter format, and what the backbone refuses."""

from __future__ import annotations

import pytest
import torch
from helpers import CLASS_NAMES, save_tiny_clip
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from siglip_helpers import TEXT_CONTEXT, save_tiny_siglip
from transformers import AutoTokenizer, CLIPModel, SiglipModel

from dpt_peft import DPTConfig, DPTPeftModel
from dpt_peft.backbones import SiglipBackbone, backbone_for
from dpt_peft.layer import DPTLayer
from dpt_peft.prototypes import init_visual_prompts_from_prototypes

PHRASE = "a photo of a"
EQUIVALENT_TEXT = {"end": "a photo of a {}.", "middle": "a photo {} of a.", "front": "{} a photo of a."}


@pytest.fixture(scope="module", params=["<pad>", "</s>"], ids=["gemma_pad", "siglip_pad"])
def siglip_path(request, tmp_path_factory) -> str:
    return save_tiny_siglip(tmp_path_factory.mktemp("tiny_siglip"), pad_token=request.param)


@pytest.fixture
def siglip(siglip_path) -> SiglipModel:
    return SiglipModel.from_pretrained(siglip_path).eval()


def siglip_logits(siglip_path: str, texts: list[str], pixel_values: torch.Tensor) -> torch.Tensor:
    """SigLIP's own logits_per_image, its text padded to the context as it was trained (no attention mask)."""
    reference = SiglipModel.from_pretrained(siglip_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(siglip_path)
    input_ids = tokenizer(texts, padding="max_length", max_length=TEXT_CONTEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return reference(input_ids=input_ids, pixel_values=pixel_values).logits_per_image


def templates(template: str) -> list[str]:
    return [template.format(name.replace("_", " ")) for name in CLASS_NAMES]


def test_zero_shot_logits_are_siglips_own(siglip, siglip_path, pixel_values):
    """The frozen zero-shot classifier (every prompt bypassed) of a full DPT adapter is SigLIP on the template.
    (An adapter with every prompt off wraps nothing, which PEFT refuses, for CLIP as for SigLIP.)"""
    model = get_peft_model(siglip, DPTConfig(class_names=CLASS_NAMES, num_text_tokens=4)).eval()
    with torch.no_grad():
        output = model(pixel_values=pixel_values, output_zero_shot_logits=True)
    expected = siglip_logits(siglip_path, templates("a photo of a {}."), pixel_values)
    torch.testing.assert_close(output.zero_shot_logits, expected, rtol=1e-5, atol=1e-5)
    # The zero-shot classifier (CAVPT's top-K, guidance) ranks exactly as SigLIP does.
    assert torch.equal(output.zero_shot_logits.argsort(dim=-1), expected.argsort(dim=-1))


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_phrase_context_equals_zero_shot_siglip(siglip, siglip_path, pixel_values, position):
    config = DPTConfig(
        class_names=CLASS_NAMES, text_init=PHRASE, class_token_position=position, num_visual_tokens=0, class_aware=False
    )
    model = get_peft_model(siglip, config).eval()
    layout = model.base_model.task_classes("default").prompt_layout
    assert layout.input_ids.shape == (len(CLASS_NAMES), TEXT_CONTEXT)  # padded to the context, as SigLIP is trained
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
    expected = siglip_logits(siglip_path, templates(EQUIVALENT_TEXT[position]), pixel_values)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_class_prompts_are_the_tokenizers_own_max_length_padding(siglip, siglip_path):
    model = get_peft_model(siglip, DPTConfig.for_method("vpt", class_names=CLASS_NAMES))
    tokenizer = AutoTokenizer.from_pretrained(siglip_path)
    expected = tokenizer(templates("a photo of a {}."), padding="max_length", max_length=TEXT_CONTEXT)["input_ids"]
    assert model.base_model.task_classes("default").template_ids.tolist() == expected
    prompt_format = model.base_model.backbone.prompt_format(tokenizer)
    assert prompt_format.start_id is None and prompt_format.end_id == tokenizer.eos_token_id
    assert prompt_format.pad_id == tokenizer.pad_token_id and prompt_format.pad_to_context


@pytest.mark.parametrize("method", ["coop", "vpt", "vpt_coop", "dpt"])
def test_training_lowers_loss_and_only_trains_prompts(siglip, pixel_values, labels, method):
    torch.manual_seed(0)
    model = get_peft_model(siglip, DPTConfig.for_method(method, class_names=CLASS_NAMES, num_text_tokens=4))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".dpt_" in n for n in trainable)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model(pixel_values=pixel_values, labels=labels, guidance=method == "dpt").loss
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert losses[-1] < losses[0]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is None for n, p in model.named_parameters() if ".dpt_" not in n)


def test_logit_bias_shifts_logits_but_no_loss(siglip, pixel_values, labels):
    """The bias is SigLIP's (sigmoid(logits) is its match probability) and the same for every class, so the
    cross-entropies (joint, guidance) and the auxiliary CAVPT loss do not see it."""
    torch.manual_seed(0)
    model = get_peft_model(siglip, DPTConfig(class_names=CLASS_NAMES, num_text_tokens=4)).eval()
    with torch.no_grad():
        before = model(pixel_values=pixel_values, labels=labels, guidance=True)
        siglip.logit_bias.add_(3.0)
        after = model(pixel_values=pixel_values, labels=labels, guidance=True)
    torch.testing.assert_close(after.logits, before.logits + 3.0)
    torch.testing.assert_close(after.loss, before.loss)
    torch.testing.assert_close(after.class_aware_loss, before.class_aware_loss)
    assert torch.equal(after.class_aware_indices, before.class_aware_indices)


def test_visual_prompts_are_dropped_before_the_pooling_head(siglip, pixel_values):
    """The attention-pooling head sees the patch tokens only: prompts leave after every layer (VPT's convention)."""
    model = get_peft_model(siglip, DPTConfig(class_names=CLASS_NAMES, num_text_tokens=4)).eval()
    seen = []
    handle = siglip.vision_model.head.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    with torch.no_grad():
        model(pixel_values=pixel_values)
    handle.remove()
    assert seen == [(4, 16, 48)] * 2  # the zero-shot pass and the prompted pass: 16 patches each, no prompt
    assert model.base_model.backbone.num_prefix_tokens == 0


def test_text_path_is_full_and_shared_prefix_is_refused(siglip):
    model = get_peft_model(siglip, DPTConfig(class_names=CLASS_NAMES, num_text_tokens=4)).eval()
    layout = model.base_model.task_classes("default").prompt_layout
    assert model.base_model.class_features.shared_prefix_length(layout, "default", "auto") == 0  # the full path
    with pytest.raises(ValueError, match="text_encoding='shared_prefix' needs a causal text tower.*siglip"):
        get_peft_model(SiglipModel(siglip.config), DPTConfig(class_names=CLASS_NAMES, text_encoding="shared_prefix"))


def test_class_features_are_cached_at_inference(siglip, pixel_values):
    model = get_peft_model(siglip, DPTConfig(class_names=CLASS_NAMES, num_text_tokens=4)).eval()
    calls = []
    handle = siglip.text_model.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        first = model(pixel_values=pixel_values).logits
        count = len(calls)
        second = model(pixel_values=pixel_values).logits
    handle.remove()
    assert count == 2 and len(calls) == count  # learned and template features once, then from the cache
    assert torch.equal(first, second)


def test_disable_adapter_and_unload_give_the_base_siglip(siglip_path, pixel_values):
    reference = SiglipModel.from_pretrained(siglip_path).eval()
    siglip = SiglipModel.from_pretrained(siglip_path).eval()
    model = get_peft_model(siglip, DPTConfig(class_names=CLASS_NAMES)).eval()
    tokenizer = AutoTokenizer.from_pretrained(siglip_path)
    input_ids = tokenizer(["a photo of a cat.", "a dog"], padding="max_length", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = reference(input_ids=input_ids, pixel_values=pixel_values)
        with model.disable_adapter():
            disabled = model(input_ids=input_ids, pixel_values=pixel_values)
    assert torch.equal(disabled.logits_per_image, expected.logits_per_image)
    base = model.unload()
    assert base is siglip and not any(isinstance(m, DPTLayer) for m in base.modules())
    assert all(torch.equal(base.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_save_and_load_give_identical_logits_and_record_the_family(siglip_path, pixel_values, tmp_path):
    model = get_peft_model(SiglipModel.from_pretrained(siglip_path), DPTConfig(class_names=CLASS_NAMES))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.eval().save_pretrained(tmp_path)
    assert DPTConfig.from_pretrained(str(tmp_path)).base_model_family == "siglip"
    loaded = PeftModel.from_pretrained(SiglipModel.from_pretrained(siglip_path), tmp_path).eval()
    assert isinstance(loaded, DPTPeftModel)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixel_values).logits, loaded(pixel_values=pixel_values).logits)
    clip = CLIPModel.from_pretrained(save_tiny_clip(tmp_path / "clip", vision_width=48, vision_layers=3))
    with pytest.raises(ValueError, match=r"siglip base model \(base_model_family.*into a clip"):
        PeftModel.from_pretrained(clip, tmp_path)


def test_spt_prototypes_and_mvlpt_transfer_on_siglip(siglip_path, pixel_values, tmp_path):
    config = dict(num_visual_tokens=3, visual_depth=2, class_aware=False, num_text_tokens=4)
    source = get_peft_model(SiglipModel.from_pretrained(siglip_path), DPTConfig(class_names=CLASS_NAMES, **config))
    prompts = init_visual_prompts_from_prototypes(source, [pixel_values], method="random")
    with torch.no_grad():
        hidden = SiglipModel.from_pretrained(siglip_path).vision_model(pixel_values, output_hidden_states=True)
    for index, rows in prompts.items():  # no CLS to remove: every token entering the layer is a patch
        tokens = hidden.hidden_states[index].reshape(-1, 48)
        assert all(torch.isclose(tokens, row, atol=1e-6).all(-1).any() for row in rows)
    source.save_pretrained(tmp_path / "source")
    target = get_peft_model(
        SiglipModel.from_pretrained(siglip_path),
        DPTConfig(class_names=["bird", "fish"], init_from=[str(tmp_path / "source")], **config),
    )
    assert torch.equal(target.base_model.text_context(), source.base_model.text_context())
    assert all(torch.equal(target.base_model.visual_prompts()[i], p) for i, p in prompts.items())


def test_class_aware_attention_maps_cover_the_patches(siglip, pixel_values):
    from dpt_peft.integrations.visualize import class_aware_attention

    model = get_peft_model(siglip, DPTConfig(class_names=CLASS_NAMES, num_text_tokens=4))
    attention = class_aware_attention(model, pixel_values[0], "dog")
    assert attention.weights.shape == (4, 4)
    torch.testing.assert_close(attention.weights.sum(), torch.tensor(1.0))


def test_siglip2_naflex_is_refused_by_name():
    from transformers import Siglip2Config, Siglip2Model

    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    naflex = Siglip2Model(Siglip2Config(text_config=dict(vocab_size=32, **tiny), vision_config=tiny))
    with pytest.raises(TypeError, match="NaFlex.*Siglip2Model.*fixed-resolution"):
        backbone_for(naflex)
    with pytest.raises(TypeError, match="NaFlex"):
        get_peft_model(naflex, DPTConfig(class_names=CLASS_NAMES))


def test_a_siglip_without_its_pooling_head_is_refused(siglip):
    siglip.config.vision_config.vision_use_head = False
    with pytest.raises(ValueError, match="vision_use_head=False"):
        SiglipBackbone(siglip)


def test_auto_model_pipeline_and_card_on_siglip(siglip_path, tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor, pipeline

    from dpt_peft.integrations.auto import AutoDPTModel

    model = get_peft_model(SiglipModel.from_pretrained(siglip_path), DPTConfig(class_names=CLASS_NAMES)).eval()
    model.save_pretrained(tmp_path)
    assert "- siglip" in (tmp_path / "README.md").read_text()  # the card's tags name the base family
    loaded = AutoDPTModel.from_pretrained(str(tmp_path))
    image = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    pixel_values = AutoImageProcessor.from_pretrained(siglip_path)(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits.softmax(-1)[0]
        torch.testing.assert_close(loaded(pixel_values=pixel_values).logits.softmax(-1)[0], expected)
    result = pipeline("dpt-image-classification", model=loaded, device="cpu")(image)
    assert {row["label"]: row["score"] for row in result} == pytest.approx(dict(zip(CLASS_NAMES, expected.tolist())))


def test_the_shipped_toy_siglip_loads_offline_under_its_id():
    from dpt_peft.sources import load_base_model, load_image_processor

    siglip, processor = load_base_model("dpt-peft/toy-siglip"), load_image_processor("dpt-peft/toy-siglip")
    assert isinstance(siglip, SiglipModel) and siglip.name_or_path == "dpt-peft/toy-siglip"
    model = get_peft_model(siglip, DPTConfig(class_names=["left", "right"], num_text_tokens=4))
    assert model.peft_config["default"].base_model_name_or_path == "dpt-peft/toy-siglip"
    texts = ["a photo of a left.", "a photo of a right."]
    expected = model.base_model.tokenizer()(texts, padding="max_length", max_length=16)["input_ids"]
    assert model.base_model.task_classes("default").template_ids.tolist() == expected
    assert list(processor.image_mean) == [0.5, 0.5, 0.5]


def test_the_toy_siglip_knows_its_world_and_its_head_is_fitted():
    """The shipped towers carry position (zero-shot 83.7% on toy-position's 600 test images when measured), and the
    sigmoid head moved from SigLIP's start (t = 10, b = -10) to fit the pairs."""
    from dpt_peft.sources import load_base_model, load_image_processor
    from dpt_peft.toy.tasks import toy_dataset

    siglip, processor = load_base_model("dpt-peft/toy-siglip"), load_image_processor("dpt-peft/toy-siglip")
    test = toy_dataset("position")["test"]
    names = test.features["label"].names
    model = get_peft_model(siglip, DPTConfig(class_names=names, num_text_tokens=4, num_visual_tokens=0))
    pixels = processor(images=list(test["image"]), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        predicted = model(pixel_values=pixels).zero_shot_logits.argmax(dim=-1)
    assert (predicted == torch.tensor(list(test["label"]))).float().mean().item() > 0.75
    assert siglip.logit_scale.exp().item() > 15 and siglip.logit_bias.item() < -12


def test_the_toy_siglip_gets_its_own_defaults():
    from dpt_peft.training.arguments import TrainArguments

    overrides = TrainArguments(model_name_or_path="dpt-peft/toy-siglip").config_overrides({"num_visual_tokens": 5})
    assert overrides == {"num_text_tokens": 4, "num_visual_tokens": 5}
    assert TrainArguments().config_overrides({}) == {"num_text_tokens": 4}


def test_toy_siglip_pretraining_is_deterministic(tmp_path):
    from dpt_peft.toy.siglip import pretrain_siglip

    weights = []
    for run in ("a", "b"):
        folder = pretrain_siglip(tmp_path / run, steps=52, batch_size=8, head_batches=1)
        weights.append(load_file(folder / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
