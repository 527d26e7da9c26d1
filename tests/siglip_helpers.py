"""Tiny SigLIPs built from `SiglipConfig` with an offline tokenizer saved beside them (no Hub, no sentencepiece).

As for the tiny CLIPs, widths differ on purpose (vision 48, text 32; the text head maps to the vision width, SigLIP's
joint space) so that a mix-up of dimensions fails loudly. The text context is SigLIP's 64 positions.
"""

from __future__ import annotations

import torch
from helpers import WORDS
from transformers import SiglipConfig, SiglipModel

from dpt_peft.toy.siglip import build_siglip_tokenizer, siglip_image_processor

TEXT_CONTEXT = 64


def tiny_siglip_config(pad_token: str) -> dict:
    tokenizer = build_siglip_tokenizer(WORDS, pad_token=pad_token)
    return dict(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TEXT_CONTEXT,
            projection_size=48,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
        ),
    )


def save_tiny_siglip(path, seed: int = 0, pad_token: str = "<pad>") -> str:
    """A random tiny SigLIP; `pad_token="</s>"` pads as SiglipTokenizer does, `"<pad>"` as Gemma's tokenizer does."""
    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(**tiny_siglip_config(pad_token))).eval()
    with torch.no_grad():  # SigLIP's trained temperature and bias are far from the init's zeros
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-4.0)
    model.save_pretrained(path)
    tokenizer = build_siglip_tokenizer(WORDS, pad_token=pad_token)
    tokenizer.model_max_length = TEXT_CONTEXT
    tokenizer.save_pretrained(path)
    siglip_image_processor().save_pretrained(path)
    return str(path)
