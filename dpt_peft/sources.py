"""The one place that loads a base CLIP (the shipped toy CLIP by default) and a DPT adapter onto it."""

from __future__ import annotations

import os
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoImageProcessor, CLIPModel

from .toy.pretrain import TOY_CLIP_ID, resolve_model_path


def load_clip(model_name_or_path: str | None = None, **kwargs: Any) -> tuple[CLIPModel, Any]:
    """Base CLIP and its image processor; `kwargs` go to `CLIPModel.from_pretrained` (e.g. attn_implementation).

    Without a name, the toy CLIP of the embedded default, named `TOY_CLIP_ID` so that adapters trained on it record
    no path of this machine.
    """
    name = model_name_or_path or TOY_CLIP_ID
    path = resolve_model_path(name)
    clip = CLIPModel.from_pretrained(path, **kwargs)
    if name == TOY_CLIP_ID:
        clip.name_or_path = TOY_CLIP_ID
    return clip, AutoImageProcessor.from_pretrained(path)


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
