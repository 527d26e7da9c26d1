"""The one place that loads a base CLIP (the shipped toy CLIP by default) and a DPT adapter onto it."""

from __future__ import annotations

import os
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoImageProcessor, CLIPModel

from .toy.pretrain import toy_clip_path


def base_model_path(model_name_or_path: str | None) -> str:
    """The CLIP to use: the one given, or the toy CLIP of the embedded default."""
    return model_name_or_path or toy_clip_path()


def load_clip(model_name_or_path: str | None = None, **kwargs: Any) -> tuple[CLIPModel, Any]:
    """Base CLIP and its image processor; `kwargs` go to `CLIPModel.from_pretrained` (e.g. attn_implementation)."""
    path = base_model_path(model_name_or_path)
    return CLIPModel.from_pretrained(path, **kwargs), AutoImageProcessor.from_pretrained(path)


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one per line (blank lines ignored)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def load_adapted_model(
    adapter: str,
    model_name_or_path: str | None = None,
    class_names: list[str] | None = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> tuple[PeftModel, Any]:
    """Base CLIP + adapter in eval mode on `device` (default: CUDA when there is one), optionally with a new label
    space, and the image processor."""
    clip, processor = load_clip(model_name_or_path, **kwargs)
    model = PeftModel.from_pretrained(clip, adapter)
    if class_names:
        model.set_class_names(class_names)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), processor
