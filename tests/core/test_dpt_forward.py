"""Behaviour of the DPT adapter, checked against plain re-computations of docs/method.md sections 1-4."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import CLASS_NAMES
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoTokenizer, CLIPModel

from dpt_peft import DPTConfig, DPTPeftModel
from dpt_peft.layer import DPTLayer

PHRASE = "a photo of a"
# With the 4-token phrase as context, each class-token position equals a hand-written prompt.
EQUIVALENT_TEXT = {
    "end": "a photo of a {}.",
    "middle": "a photo {} of a.",
    "front": "{} a photo of a.",
}


def clip_logits(clip: CLIPModel, clip_path: str, texts: list[str], pixel_values: torch.Tensor) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(clip_path)
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return clip(**inputs, pixel_values=pixel_values).logits_per_image


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_phrase_context_equals_zero_shot_clip(clip_path, pixel_values, position):
    """docs/method.md 1: context initialized from a phrase, no visual prompts -> CLIP's zero-shot logits."""
    reference = CLIPModel.from_pretrained(clip_path).eval()
    model = get_peft_model(
        CLIPModel.from_pretrained(clip_path),
        DPTConfig(
            class_names=CLASS_NAMES,
            text_init=PHRASE,
            class_token_position=position,
            num_visual_tokens=0,
            class_aware=False,
        ),
    ).eval()
    texts = [EQUIVALENT_TEXT[position].format(name.replace("_", " ")) for name in CLASS_NAMES]
    expected = clip_logits(reference, clip_path, texts, pixel_values)
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
    assert logits.shape == (4, len(CLASS_NAMES))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_truncated_prompts_equal_full_context(clip, clip_path):
    """Cutting prompts after the longest EOT is exact under causal attention (docs/method.md 8)."""
    from dpt_peft.class_prompts import build_prompt_layout

    model = get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES, num_text_tokens=3, class_aware=False)).eval()
    tuner = model.base_model
    tokenizer = AutoTokenizer.from_pretrained(clip_path)
    full = build_prompt_layout(tokenizer, tuner.backbone.prompt_format(tokenizer), CLASS_NAMES, 3, "end", 24, pad_to=24)
    short = tuner.task_classes("default").prompt_layout
    assert short.input_ids.shape[1] < full.input_ids.shape[1] == 24
    encode = functools.partial(tuner.class_features.encode_text, adapter_name="default", text_encoding="auto")
    with torch.no_grad():
        torch.testing.assert_close(encode(short.input_ids, short), encode(full.input_ids, full), rtol=1e-5, atol=1e-6)


def test_prompts_appended_after_patches_equal_prompts_after_cls(clip, pixel_values):
    """docs/method.md 2: attention is permutation-equivariant, so where the prompts go does not change CLS."""
    layer = clip.vision_model.encoder.layers[0]
    tokens = clip.vision_model.pre_layrnorm(clip.vision_model.embeddings(pixel_values))
    prompts = torch.randn(4, 5, tokens.shape[-1])
    with torch.no_grad():
        after_patches = layer(torch.cat([tokens, prompts], 1), None)[:, 0]
        after_cls = layer(torch.cat([tokens[:, :1], prompts, tokens[:, 1:]], 1), None)[:, 0]
    torch.testing.assert_close(after_patches, after_cls, rtol=1e-5, atol=1e-5)


def _reference_dpt_forward(clip, clip_path, model, pixel_values, labels, top_k):
    """docs/method.md sections 2-4 written out plainly on an unwrapped CLIP with the adapter's weights."""
    tokenizer = AutoTokenizer.from_pretrained(clip_path)
    names = [n.replace("_", " ") for n in CLASS_NAMES]
    scale = clip.logit_scale.exp()
    with torch.no_grad():
        zs_text = clip.get_text_features(
            **tokenizer([f"a photo of a {n}." for n in names], padding=True, return_tensors="pt")
        ).pooler_output
        zs_image = clip.get_image_features(pixel_values=pixel_values).pooler_output
    # Learned text features: the context still equals the phrase, so they are CLIP's features of the phrase.
    text = zs_text
    zs_logits = scale * F.normalize(zs_image, dim=-1) @ F.normalize(zs_text, dim=-1).t()
    selected = zs_logits.topk(top_k, dim=-1).indices  # step 1
    vision = clip.vision_model
    x = vision.pre_layrnorm(vision.embeddings(pixel_values))
    num_layers = len(vision.encoder.layers)
    aux_per_layer = []
    for index, layer in enumerate(vision.encoder.layers):
        prompts = []
        wrapped = model.base_model.model.vision_model.encoder.layers[index]
        if "default" in wrapped.dpt_visual_prompts:
            prompts.append(wrapped.dpt_visual_prompts["default"].expand(x.shape[0], -1, -1))
        if "default" in wrapped.dpt_class_aware:
            g = wrapped.dpt_class_aware["default"]
            q0 = text[selected] @ g.query_proj.weight.t() + g.query_proj.bias  # step 2
            kv = torch.cat([x.detach(), g.kv_tokens.expand(x.shape[0], -1, -1)], dim=1)  # step 3
            q = q0 @ g.q_proj.weight.t()
            k = kv @ g.k_proj.weight.t()
            attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(32), dim=-1)  # step 4
            out = (attention @ kv) @ g.v_proj.weight.t()
            prompt = F.layer_norm(out + q0, (out.shape[-1],), g.prompt_norm.weight, g.prompt_norm.bias)  # step 5
            aux = F.layer_norm(out, (out.shape[-1],), g.classifier_norm.weight, g.classifier_norm.bias)
            aux_per_layer.append(aux @ g.classifier.weight.t())  # step 6
            prompts.append(prompt)
        n = x.shape[1]
        x = layer(torch.cat([x, *prompts], dim=1), None)[:, :n]
    image = clip.visual_projection(vision.post_layernorm(x[:, 0]))
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    terms = [
        F.cross_entropy(aux_per_layer[layer][b, j][None], labels[b][None])
        for layer in range(len(aux_per_layer))
        for b in range(len(labels))
        for j in range(top_k)
        if selected[b, j] == labels[b]
    ]
    aux_loss = torch.stack(terms).mean()
    assert num_layers == 3 and len(aux_per_layer) == 2
    return logits, zs_logits, selected, aux_per_layer, aux_loss


def test_class_aware_forward_matches_plain_recomputation(clip_path, pixel_values):
    """docs/method.md 3: top-K selection, detached keys, extra kv tokens, residual, both norms, auxiliary loss."""
    model = get_peft_model(
        CLIPModel.from_pretrained(clip_path),
        DPTConfig(
            class_names=CLASS_NAMES, text_init=PHRASE, num_visual_tokens=2, class_aware_layer=1, class_aware_top_k=3
        ),
    ).eval()
    clip = CLIPModel.from_pretrained(clip_path).eval()
    with torch.no_grad():
        zero_shot = model(pixel_values=pixel_values, output_zero_shot_logits=True).zero_shot_logits
    top = zero_shot.topk(3, dim=-1).indices
    # Two images whose label is among their top-3 classes, two whose label is not.
    outside = [next(c for c in range(5) if c not in top[b]) for b in range(4)]
    labels = torch.tensor([top[0, 0], top[1, 2], outside[2], outside[3]])
    output = model(pixel_values=pixel_values, labels=labels)
    logits, zs_logits, selected, aux, aux_loss = _reference_dpt_forward(clip, clip_path, model, pixel_values, labels, 3)
    torch.testing.assert_close(output.zero_shot_logits, zs_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(output.class_aware_indices, selected)
    assert len(output.class_aware_logits) == 2
    for ours, theirs in zip(output.class_aware_logits, aux):
        assert ours.shape == (4, 3, len(CLASS_NAMES))
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.class_aware_loss, aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.loss, F.cross_entropy(logits, labels) + 0.3 * aux_loss, rtol=1e-5, atol=1e-6)


def test_class_aware_keys_are_detached(clip, pixel_values, labels):
    """The auxiliary loss trains CAVPT and the text context, never the earlier visual prompts via the keys."""
    model = get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES, num_text_tokens=2, class_aware_top_k=5))
    output = model(pixel_values=pixel_values, labels=labels)
    output.class_aware_loss.backward()
    layers = model.base_model.model.vision_model.encoder.layers
    assert layers[0].dpt_visual_prompts["default"].grad is None
    assert layers[2].dpt_class_aware["default"].kv_tokens.grad.abs().sum() > 0
    assert model.base_model.model.text_model.embeddings.dpt_context["default"].grad.abs().sum() > 0


def test_class_aware_loss_is_zero_when_no_label_is_selected(clip, pixel_values):
    model = get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES, num_text_tokens=2, class_aware_top_k=1))
    with torch.no_grad():
        top1 = model(pixel_values=pixel_values).class_aware_indices[:, 0]
    labels = (top1 + 1) % len(CLASS_NAMES)
    output = model(pixel_values=pixel_values, labels=labels)
    assert output.class_aware_loss.item() == 0.0
    torch.testing.assert_close(output.loss, F.cross_entropy(output.logits, labels))


def test_guidance_loss_matches_reference_formula(clip, pixel_values, labels):
    """docs/method.md 4: CE(zs_img, learned text) + CE(prompted img, hand-crafted text) + 0.1 CE(joint) + aux."""
    model = get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES, num_text_tokens=2, class_aware_top_k=5))
    output = model(pixel_values=pixel_values, labels=labels, guidance=True, output_text_embeds=True)
    tuner = model.base_model
    with torch.no_grad():
        zs_text = model.zero_shot_text_features()
        zs_image = model.zero_shot_image_features(pixel_values)
    scale = tuner.model.logit_scale.exp()
    cosine = lambda a, b: scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()  # noqa: E731
    expected = (
        F.cross_entropy(cosine(zs_image, output.text_embeds), labels)
        + F.cross_entropy(cosine(output.image_embeds, zs_text), labels)
        + 0.1 * F.cross_entropy(output.logits, labels)
        + 0.3 * output.class_aware_loss
    )
    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-6)
    assert model(pixel_values=pixel_values).text_embeds is None  # the class features `[C, P]` only when asked


@pytest.mark.parametrize("method", ["coop", "vpt", "vpt_coop", "dpt"])
def test_training_lowers_loss_and_only_trains_prompts(clip_path, pixel_values, labels, method):
    torch.manual_seed(0)
    model = get_peft_model(
        CLIPModel.from_pretrained(clip_path), DPTConfig.for_method(method, class_names=CLASS_NAMES, num_text_tokens=4)
    )
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".dpt_" in n for n in trainable)
    optimizer = torch.optim.AdamW(trainable.values(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(pixel_values=pixel_values, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert losses[-1] < 0.85 * losses[0]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is None for n, p in model.named_parameters() if ".dpt_" not in n)
    kinds = {n.split(".dpt_")[1].split(".")[0] for n in trainable}
    expected = {
        "coop": {"context"},
        "vpt": {"visual_prompts"},
        "vpt_coop": {"context", "visual_prompts"},
        "dpt": {"context", "visual_prompts", "class_aware"},
    }[method]
    assert kinds == expected


def test_save_and_load_give_identical_logits(clip_path, pixel_values, tmp_path):
    model = get_peft_model(CLIPModel.from_pretrained(clip_path), DPTConfig(class_names=CLASS_NAMES))
    with torch.no_grad():  # move every prompt away from its init
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.eval()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(".dpt_" in k and ".default" not in k for k in keys)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        safe_open(tmp_path / "adapter_model.safetensors", "pt").get_tensor(k).numel() for k in keys
    )
    loaded = PeftModel.from_pretrained(CLIPModel.from_pretrained(clip_path), tmp_path).eval()
    assert isinstance(loaded, DPTPeftModel)
    assert loaded.peft_config["default"].class_names == CLASS_NAMES
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixel_values).logits, loaded(pixel_values=pixel_values).logits)


def test_disable_adapter_and_unload_give_the_base_clip(clip_path, pixel_values):
    reference = CLIPModel.from_pretrained(clip_path).eval()
    clip = CLIPModel.from_pretrained(clip_path).eval()
    model = get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES)).eval()
    tokenizer = AutoTokenizer.from_pretrained(clip_path)
    inputs = tokenizer(["a photo of a cat.", "a dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**inputs, pixel_values=pixel_values)
        with model.disable_adapter():
            disabled = model(**inputs, pixel_values=pixel_values)
        enabled = model(pixel_values=pixel_values)
    assert torch.equal(disabled.logits_per_image, expected.logits_per_image)
    assert enabled.logits.shape == (4, len(CLASS_NAMES))
    base = model.unload()
    assert base is clip and not any(isinstance(m, DPTLayer) for m in base.modules())
    assert [type(m) for m in base.modules()] == [type(m) for m in reference.modules()]
    assert base.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_several_named_adapters_share_one_clip(clip_path, pixel_values, tmp_path):
    model = get_peft_model(CLIPModel.from_pretrained(clip_path), DPTConfig(class_names=CLASS_NAMES)).eval()
    model.add_adapter("coop", DPTConfig.for_method("coop", class_names=["bird", "fish"], num_text_tokens=2))
    with torch.no_grad():
        default_logits = model(pixel_values=pixel_values).logits
        model.set_adapter("coop")
        coop_logits = model(pixel_values=pixel_values).logits
    assert default_logits.shape == (4, 5) and coop_logits.shape == (4, 2)
    model.save_pretrained(tmp_path, selected_adapters=["coop"])
    model.load_adapter(tmp_path / "coop", "coop_copy")
    model.set_adapter("coop_copy")
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixel_values).logits, coop_logits)
    model.delete_adapter("coop")
    model.set_adapter("default")
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixel_values).logits, default_logits)
    assert set(model.peft_config) == {"default", "coop_copy"}


def test_set_class_names_keeps_prompts_and_serves_new_classes(clip_path, pixel_values):
    reference = CLIPModel.from_pretrained(clip_path).eval()
    model = get_peft_model(
        CLIPModel.from_pretrained(clip_path),
        DPTConfig(class_names=CLASS_NAMES, text_init=PHRASE, num_visual_tokens=0, class_aware=False),
    ).eval()
    context = model.base_model.model.text_model.embeddings.dpt_context["default"].detach().clone()
    new_names = ["bird", "fish", "tree"]
    model.set_class_names(new_names)
    expected = clip_logits(reference, clip_path, [f"a photo of a {n}." for n in new_names], pixel_values)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixel_values).logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.base_model.model.text_model.embeddings.dpt_context["default"], context)
    assert model.peft_config["default"].class_names == new_names


def test_set_class_names_rebuilds_the_auxiliary_classifier(clip, pixel_values):
    model = get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES, num_text_tokens=2))
    generator = model.base_model.model.vision_model.encoder.layers[2].dpt_class_aware["default"]
    kv_tokens = generator.kv_tokens.detach().clone()
    model.set_class_names(["bird", "fish"])
    assert generator.classifier.weight.shape == (2, 48) and torch.equal(generator.kv_tokens, kv_tokens)
    assert model(pixel_values=pixel_values, labels=torch.tensor([0, 1, 1, 0])).class_aware_logits[0].shape == (4, 2, 2)


def test_class_features_are_cached_at_inference_until_prompts_or_classes_change(clip, pixel_values, labels):
    model = get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES, num_text_tokens=2))
    features = model.base_model.class_features
    calls = []
    original = features.encode_text
    features.encode_text = lambda *a, **k: calls.append(1) or original(*a, **k)
    with torch.no_grad():
        first = model(pixel_values=pixel_values).logits
        model(pixel_values=pixel_values)
    assert len(calls) == 2  # learned + zero-shot features, once each
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(pixel_values=pixel_values, labels=labels).loss.backward()
    optimizer.step()
    calls.clear()
    with torch.no_grad():
        after_step = model(pixel_values=pixel_values).logits
    assert len(calls) == 1  # the learned features are recomputed, the frozen ones are not
    assert not torch.equal(first, after_step)
    model.set_class_names(["bird", "fish"])
    calls.clear()
    with torch.no_grad():
        assert model(pixel_values=pixel_values).logits.shape == (4, 2)
    assert len(calls) == 2


def test_class_specific_context_has_one_context_per_class(clip, pixel_values, labels):
    model = get_peft_model(clip, DPTConfig(class_names=CLASS_NAMES, num_text_tokens=3, class_specific_context=True))
    context = model.base_model.model.text_model.embeddings.dpt_context["default"]
    assert context.shape == (len(CLASS_NAMES), 3, 32)
    model(pixel_values=pixel_values, labels=labels).loss.backward()
    assert (context.grad.abs().sum(dim=(1, 2)) > 0).all()
