"""Shared-prefix text encoding (`dpt_peft/shared_prefix.py`) against CLIP's full text encoder.

The reference is DPT's own full path, `ClassFeatures.encode_text` (the wrapped `TextContextEmbeddings` feeding
`CLIPModel.get_text_features`); the shared path gets the same embeddings and context parameter.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import CLASS_NAMES, WORDS, tiny_clip_config
from peft import PeftModel, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, PreTrainedTokenizerBase

import dpt_peft.class_features as class_features_module
from dpt_peft import DPTConfig
from dpt_peft.backbones import ClipBackbone, PromptFormat
from dpt_peft.class_prompts import PromptLayout, build_prompt_layout
from dpt_peft.shared_prefix import encode_with_shared_prefix, shared_prefix_length

NUM_CONTEXT = 4
ALL_NAMES = [*CLASS_NAMES, "bird", "fish"]  # class-specific contexts: one per class of this label space
TEXT_SHAPES = {
    "tiny": {},  # width 32, 4 heads, 2 layers
    "wide": dict(hidden_size=48, num_attention_heads=6, num_hidden_layers=3, intermediate_size=80),
    "legacy_eos": dict(eos_token_id=2),  # configs saved before transformers#24773 pool at the argmax of the ids
}


def _clip(seed: int = 0, **text_config) -> CLIPModel:
    config = tiny_clip_config()
    config["text_config"].update(text_config)
    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig(**config)).eval()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: a second thread only adds synchronization, which costs ~100x on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _dpt(clip_path: str, shape: str, class_specific: bool) -> PeftModel:
    """A CoOp-style adapter (text context only); its class features' `encode_text` is the full-path reference."""
    config = DPTConfig(
        class_names=ALL_NAMES,
        num_text_tokens=NUM_CONTEXT,
        num_visual_tokens=0,
        class_aware=False,
        class_specific_context=class_specific,
        tokenizer_name_or_path=clip_path,
        text_encoding="full",  # the reference path; the shared one is called explicitly
    )
    return get_peft_model(_clip(**TEXT_SHAPES[shape]), config).eval()


@functools.cache
def _backbone() -> ClipBackbone:
    return ClipBackbone(_clip())


def _format(tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
    return _backbone().prompt_format(tokenizer)


def _layout(tokenizer: PreTrainedTokenizerBase, names: list[str], position: str = "end", **kwargs) -> PromptLayout:
    return build_prompt_layout(tokenizer, _format(tokenizer), names, NUM_CONTEXT, position, max_length=24, **kwargs)


def _concat(*layouts: PromptLayout) -> PromptLayout:
    """Several tasks' class prompts (built with the same `pad_to`) encoded in one batch."""
    fields = ("input_ids", "context_mask", "context_index")
    return PromptLayout(*(torch.cat([getattr(layout, field) for layout in layouts]) for field in fields))


LAYOUT_NAMES = [
    "end",
    "middle",
    "front",
    "end_same_first_word",
    "end_class_specific",
    "middle_class_specific",
    "multitask",
    "multitask_class_specific",
]


def _layouts(tokenizer: PreTrainedTokenizerBase) -> dict[str, tuple[PromptLayout, int]]:
    """Layouts by name, with the shared prefix length each must have."""
    specific = dict(class_specific=True)
    return {
        "end": (_layout(tokenizer, CLASS_NAMES, "end"), 1 + NUM_CONTEXT),
        "middle": (_layout(tokenizer, CLASS_NAMES, "middle"), 1 + NUM_CONTEXT // 2),
        "front": (_layout(tokenizer, CLASS_NAMES, "front"), 1),
        "end_same_first_word": (_layout(tokenizer, ["red car", "red fish"], "end"), 2 + NUM_CONTEXT),
        "end_class_specific": (_layout(tokenizer, ALL_NAMES[2:], "end", class_offset=2, **specific), 1),
        "middle_class_specific": (_layout(tokenizer, ALL_NAMES, "middle", **specific), 1),
        "multitask": (
            _concat(_layout(tokenizer, CLASS_NAMES, pad_to=12), _layout(tokenizer, ALL_NAMES[5:], pad_to=12)),
            1 + NUM_CONTEXT,
        ),
        "multitask_class_specific": (
            _concat(
                _layout(tokenizer, CLASS_NAMES, pad_to=12, **specific),
                _layout(tokenizer, ALL_NAMES[5:], pad_to=12, class_offset=5, **specific),
            ),
            1,
        ),
    }


def _embeds(model: PeftModel, layout: PromptLayout) -> torch.Tensor:
    """Token embeddings with the context swapped in, exactly as `TextContextEmbeddings.forward` builds them."""
    tuner = model.base_model
    context = tuner.text_context()
    tokens = tuner.token_embedding()(layout.input_ids)
    rows = context.reshape(-1, context.shape[-1])[layout.context_index].to(tokens.dtype)
    return torch.where(layout.context_mask.unsqueeze(-1), rows, tokens)


def _features_and_grad(model: PeftModel, layout: PromptLayout, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected text features `[C, P]` and the gradient of a fixed random loss w.r.t. the context."""
    tuner = model.base_model
    if shared:
        clip = tuner.model
        pooled = encode_with_shared_prefix(
            tuner.backbone, _embeds(model, layout), layout.input_ids, shared_prefix_length(layout)
        )
        features = clip.text_projection(pooled)
    else:
        features = tuner.class_features.encode_text(layout.input_ids, layout, "default", "full")
    weights = torch.randn(features.shape, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad((features.float() * weights).mean(), tuner.text_context())
    return features.detach(), grad


def _max_differences(model: PeftModel, layout: PromptLayout) -> tuple[float, float]:
    """Max abs difference of the features and of the context gradient, shared path vs full path."""
    shared, shared_grad = _features_and_grad(model, layout, shared=True)
    full, full_grad = _features_and_grad(model, layout, shared=False)
    assert shared.dtype == full.dtype and shared_grad.abs().max() > 0
    return (shared - full).abs().max().item(), (shared_grad - full_grad).abs().max().item()


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_shared_prefix_length_of_each_layout(clip_path, name):
    layout, expected = _layouts(_dpt(clip_path, "tiny", False).base_model.tokenizer())[name]
    assert shared_prefix_length(layout) == expected


@pytest.mark.parametrize("shape", list(TEXT_SHAPES))
@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_features_and_context_gradient_match_the_full_path(clip_path, shape, name):
    model = _dpt(clip_path, shape, "class_specific" in name)
    layout, _ = _layouts(model.base_model.tokenizer())[name]
    feature_difference, grad_difference = _max_differences(model, layout)
    assert feature_difference < 1e-5
    assert grad_difference < 1e-5


def test_pooling_reads_each_prompt_eot(clip_path):
    """Prompts of different lengths, cut after the longest EOT or padded with EOTs to the full context."""
    model = _dpt(clip_path, "tiny", False)
    tokenizer = model.base_model.tokenizer()
    cut, padded = _layout(tokenizer, CLASS_NAMES), _layout(tokenizer, CLASS_NAMES, pad_to=24)
    assert len(set((cut.input_ids == tokenizer.eos_token_id).int().argmax(-1).tolist())) > 1
    cut_features, cut_grad = _features_and_grad(model, cut, shared=True)
    padded_features, padded_grad = _features_and_grad(model, padded, shared=True)
    full_features, full_grad = _features_and_grad(model, padded, shared=False)
    torch.testing.assert_close(padded_features, cut_features, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded_grad, cut_grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded_features, full_features, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded_grad, full_grad, atol=1e-5, rtol=0)


def _random_prompts(text_model: CLIPTextModel, prefix_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids `[6, 12]` sharing their first `prefix_length` tokens, and the position CLIP must pool in each row.

    The vocabulary goes beyond EOT, so the two pooling rules (first EOT; argmax for legacy `eos_token_id == 2`)
    pick different positions: the wrong rule fails.
    """
    ids = torch.randint(3, text_model.config.vocab_size - 1, (6, 12), generator=torch.Generator().manual_seed(0))
    ids[ids == text_model.eos_token_id] = 3
    ids[:, :prefix_length] = ids[0, :prefix_length]
    pooled = torch.tensor([5, 7, 11, 6, 9, 8])
    marker = text_model.config.vocab_size - 1 if text_model.eos_token_id == 2 else text_model.eos_token_id
    ids[torch.arange(6), pooled] = marker
    ids[:, -1] = marker
    return ids, pooled


@pytest.mark.parametrize("shape", list(TEXT_SHAPES))
@pytest.mark.parametrize("training", [False, True])
def test_unwrapped_text_tower_matches_clip_on_random_prompts(shape, training):
    backbone = ClipBackbone(_clip(1, vocab_size=600, **TEXT_SHAPES[shape]).train(training))
    text_model = backbone.model.text_model
    ids, pooled = _random_prompts(text_model, prefix_length=5)
    other_rule = (ids == 2).int().argmax(-1) if text_model.eos_token_id == 2 else ids.argmax(-1)
    assert (other_rule != pooled).all()
    expected = text_model(input_ids=ids).pooler_output
    actual = encode_with_shared_prefix(backbone, text_model.embeddings.token_embedding(ids), ids, 5)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_rejects_attention_dropout_in_training():
    backbone = ClipBackbone(_clip(1, vocab_size=600, attention_dropout=0.1))
    text_model = backbone.model.text_model
    ids, _ = _random_prompts(text_model, prefix_length=5)
    embeds = text_model.embeddings.token_embedding(ids)
    expected = text_model(input_ids=ids).pooler_output  # eval: no dropout, the shared prefix is exact
    torch.testing.assert_close(encode_with_shared_prefix(backbone, embeds, ids, 5), expected, atol=1e-5, rtol=0)
    text_model.train()
    with pytest.raises(ValueError, match="attention_dropout"):
        encode_with_shared_prefix(backbone, embeds, ids, 5)


def test_rejects_a_prefix_that_reaches_an_eot(clip_path):
    model = _dpt(clip_path, "tiny", False)
    tokenizer, backbone = model.base_model.tokenizer(), model.base_model.backbone
    single = _layout(tokenizer, ["cat"])  # a single prompt is shared up to its end
    assert shared_prefix_length(single) == single.input_ids.shape[1]
    for layout, prefix_length in [(single, shared_prefix_length(single)), (_layout(tokenizer, CLASS_NAMES), 0)]:
        with pytest.raises(ValueError, match="EOT"):
            encode_with_shared_prefix(backbone, _embeds(model, layout), layout.input_ids, prefix_length)


@pytest.mark.parametrize("shape", ["tiny", "wide"])
@pytest.mark.parametrize("name", ["end", "middle", "multitask_class_specific"])
def test_bfloat16_autocast_agrees_with_the_full_path(clip_path, shape, name):
    """Both paths run in bf16 with float32 residuals, layer norms and softmax: they differ by a few bf16 ulps.

    Measured over all layouts and shapes: features (|f| <= 3.5) differ by at most 2.6e-2, the same as either
    path differs from float32; context gradients (|g| <= 1.5) by at most 8.6e-3.
    """
    model = _dpt(clip_path, shape, "class_specific" in name)
    layout, _ = _layouts(model.base_model.tokenizer())[name]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shared, shared_grad = _features_and_grad(model, layout, shared=True)
        full, full_grad = _features_and_grad(model, layout, shared=False)
    assert shared.dtype == full.dtype == torch.bfloat16
    torch.testing.assert_close(shared.float(), full.float(), atol=5e-2, rtol=0)
    torch.testing.assert_close(shared_grad, full_grad, atol=2e-2, rtol=0)


@pytest.mark.parametrize(("position", "prefix_length", "max_ratio"), [("end", 17, 0.22), ("middle", 9, 0.62)])
def test_flops_of_200_classes_with_16_context_tokens(clip_path, position, prefix_length, max_ratio):
    """Measured (prompts of 21 tokens, prefix of 17 for "end" and 9 for "middle"): 0.196 and 0.574 of the full path.

    The full path runs eager attention here: `FlopCounterMode` does not count CPU SDPA, which would hide its
    attention FLOPs (the ratios against SDPA read 0.228 and 0.668).
    """
    clip = _clip()
    clip.set_attn_implementation("eager")
    tokenizer = _dpt(clip_path, "tiny", False).base_model.tokenizer()
    names = [f"{first} {second}" for first in WORDS for second in WORDS][: 200 - len(WORDS)] + WORDS
    layout = build_prompt_layout(tokenizer, _format(tokenizer), names, 16, position, max_length=24)
    context = torch.randn(16, clip.config.text_config.hidden_size)
    tokens = clip.text_model.embeddings.token_embedding(layout.input_ids)
    embeds = torch.where(layout.context_mask.unsqueeze(-1), context[layout.context_index], tokens)
    assert layout.input_ids.shape == (200, 21) and shared_prefix_length(layout) == prefix_length
    with torch.no_grad(), FlopCounterMode(display=False) as shared_flops:
        pooled = encode_with_shared_prefix(ClipBackbone(clip), embeds, layout.input_ids, prefix_length)
        clip.text_projection(pooled)
    with torch.no_grad(), FlopCounterMode(display=False) as full_flops:
        clip.get_text_features(input_ids=layout.input_ids)
    assert shared_flops.get_total_flops() < max_ratio * full_flops.get_total_flops()


def _counted(calls: list, function, *args):
    calls.append(1)
    return function(*args)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_auto_text_encoding_gives_the_full_path_logits_and_gradients(clip_path, pixel_values, labels, position):
    """The default (`text_encoding="auto"`) takes the shared path whenever prompts share a prefix, with the
    same DPT loss and gradients as encoding every prompt whole."""
    results = {}
    for mode in ("auto", "full"):
        torch.manual_seed(0)
        config = DPTConfig(class_names=CLASS_NAMES, class_token_position=position, text_encoding=mode)
        model = get_peft_model(CLIPModel.from_pretrained(clip_path), config).eval()
        calls = []
        with pytest.MonkeyPatch.context() as patch:
            original = class_features_module.encode_with_shared_prefix
            counted = functools.partial(_counted, calls, original)
            patch.setattr(class_features_module, "encode_with_shared_prefix", counted)
            output = model(pixel_values=pixel_values, labels=labels, guidance=True)
        output.loss.backward()
        results[mode] = (output.logits.detach(), model.base_model.text_context().grad.clone(), bool(calls))
    assert results["auto"][2] == (position != "front") and not results["full"][2]
    torch.testing.assert_close(results["auto"][0], results["full"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["auto"][1], results["full"][1], rtol=1e-4, atol=1e-5)
