"""DPT with CLIP's real tokenizer (OpenAI's BPE vocabulary, built offline) and ImageNet's real class list."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from real_tokenizer import save_real_clip_tokenizer
from transformers import AutoTokenizer, CLIPConfig, CLIPModel

from dpt_peft import DPTConfig
from dpt_peft.backbones import ClipBackbone
from dpt_peft.class_prompts import build_prompt_layout, build_template_ids

IMAGENET = (Path(__file__).parents[1] / "fixtures" / "imagenet_classnames.txt").read_text().splitlines()
CONTEXT = 77  # CLIP's text context


@pytest.fixture(scope="module")
def real_clip_path(tmp_path_factory) -> str:
    """A small CLIP with the real vocabulary (49,408 tokens) and context (77), and the real tokenizer beside it."""
    path = save_real_clip_tokenizer(tmp_path_factory.mktemp("real_clip"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CONTEXT,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=2),
        projection_dim=24,
    )
    CLIPModel(config).eval().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(real_clip_path):
    return AutoTokenizer.from_pretrained(real_clip_path)


def test_the_tokenizer_gives_openais_ids(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat.")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 269, 49407]


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_every_imagenet_prompt_fits_the_context(real_clip_path, tokenizer, position):
    """ImageNet's 1000 names with CoOp's 16 context tokens: the longest prompt stays within CLIP's 77 positions, and
    each prompt ends with its end-of-text token right after the period (what CLIP pools)."""
    prompt_format = ClipBackbone(CLIPModel.from_pretrained(real_clip_path)).prompt_format(tokenizer)
    assert len(IMAGENET) == 1000
    layout = build_prompt_layout(tokenizer, prompt_format, IMAGENET, 16, position, CONTEXT)
    assert layout.input_ids.shape[1] <= CONTEXT
    assert int(layout.context_mask.sum(1).min()) == int(layout.context_mask.sum(1).max()) == 16
    first_end = (layout.input_ids == tokenizer.eos_token_id).int().argmax(1)
    period = tokenizer(".", add_special_tokens=False)["input_ids"][0]
    assert bool((layout.input_ids[torch.arange(1000), first_end - 1] == period).all())
    templates = build_template_ids(tokenizer, prompt_format, IMAGENET, "a photo of a {}.", CONTEXT)
    expected = [tokenizer(f"a photo of a {name}.")["input_ids"] for name in IMAGENET[:50]]
    assert [row[: len(ids)].tolist() for row, ids in zip(templates[:50], expected)] == expected


def test_end_token_pooling_gives_clips_own_zero_shot_features(real_clip_path, tokenizer):
    """With the real ids (end-of-text 49407, the largest id), the template features are CLIP's own for the tokenizer's
    padded batch."""
    names = IMAGENET[:40]
    clip = CLIPModel.from_pretrained(real_clip_path).eval()
    model = get_peft_model(clip, DPTConfig(class_names=names, num_visual_tokens=0, class_aware=False)).eval()
    batch = tokenizer([f"a photo of a {name}." for name in names], padding=True, return_tensors="pt")
    with torch.no_grad(), model.disable_adapter():
        expected = clip.get_text_features(**batch).pooler_output
    with torch.no_grad():
        actual = model.base_model.zero_shot_text_features()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("position", ["end", "middle"])
def test_shared_prefix_is_exact_with_the_real_tokenizer(real_clip_path, position):
    names = IMAGENET[100:160]
    features = {}
    for encoding in ("full", "shared_prefix"):
        torch.manual_seed(0)
        config = DPTConfig(class_names=names, class_token_position=position, class_aware=False, text_encoding=encoding)
        model = get_peft_model(CLIPModel.from_pretrained(real_clip_path), config).eval()
        with torch.no_grad():
            features[encoding] = model.base_model.class_text_features()
    torch.testing.assert_close(features["shared_prefix"], features["full"], rtol=1e-5, atol=1e-5)


def test_a_class_name_that_overflows_the_context_is_refused_by_name(real_clip_path):
    long_name = " ".join(["hippopotamus"] * 70)
    with pytest.raises(
        ValueError, match=r"class 'hippopotamus hippopotamus.*more than the text encoder's context of 77"
    ):
        get_peft_model(CLIPModel.from_pretrained(real_clip_path), DPTConfig(class_names=["cat", long_name]))
