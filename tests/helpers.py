"""Tiny CLIPs built from `CLIPConfig` with a tokenizer saved beside them (no Hub access in tests).

Widths differ on purpose (vision 48, text 32, projection 24) so that a mix-up of dimensions fails loudly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from dpt_peft.toy.pretrain import image_processor
from dpt_peft.toy.tokenizer import build_clip_tokenizer

CLASS_NAMES = ["cat", "dog", "red car", "sea_turtle", "tree"]
WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "car", "sea", "turtle", "tree", "x", "bird", "fish"]


def tiny_clip_config(vision_width: int = 48, vision_layers: int = 3, text_width: int = 32) -> dict:
    tokenizer = build_clip_tokenizer(WORDS)
    return dict(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=24,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=vision_width,
            intermediate_size=96,
            num_hidden_layers=vision_layers,
            num_attention_heads=4,
        ),
        projection_dim=24,
    )


def save_tiny_clip(path, seed: int = 0, **shape) -> str:
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(**tiny_clip_config(**shape))).eval()
    model.save_pretrained(path)
    build_clip_tokenizer(WORDS).save_pretrained(path)
    image_processor().save_pretrained(path)
    return str(path)


@contextlib.contextmanager
def killed_after_epoch(epoch: int) -> Iterator[None]:
    """A training run inside stops as a kill would, right after the checkpoint of `epoch` (0-based) is written."""
    from dpt_peft.training.checkpoints import Checkpointer

    original = Checkpointer.save

    def save_then_die(checkpointer, state, identity):
        original(checkpointer, state, identity)
        if state["epoch"] == epoch:
            raise KeyboardInterrupt(f"killed after epoch {epoch}")

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(Checkpointer, "save", save_then_die)
        yield
