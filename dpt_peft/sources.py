"""Where base models come from: the one resolver of model ids, and the loaders of a base model and of base + adapter.

Models that ship inside the package (the toy CLIP of the embedded default) have a Hub-style id. `resolve` maps the id
to the shipped folder when loading; `recorded_name` maps that folder back to the id when an adapter records its base
model, so no saved adapter holds a path of this machine. Nothing here trains a model: a missing shipped copy is an
error that says how to rebuild it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoImageProcessor, AutoModel

from .adapter_files import local_weights
from .backbones import backbone_for
from .config import DPTConfig

TOY_CLIP_ID = "dpt-peft/toy-clip"
TOY_SIGLIP_ID = "dpt-peft/toy-siglip"
_TOY = Path(__file__).resolve().parent / "toy"
SHIPPED_MODELS = {TOY_CLIP_ID: _TOY / "assets", TOY_SIGLIP_ID: _TOY / "siglip_assets"}
REBUILT_BY = {TOY_CLIP_ID: "dpt_peft.toy.pretrain", TOY_SIGLIP_ID: "dpt_peft.toy.siglip"}  # `python -m` modules


def is_shipped(name_or_path: str | None) -> bool:
    return name_or_path in SHIPPED_MODELS


def resolve(name_or_path: str) -> str:
    """A source `from_pretrained` can load: a shipped model's id becomes its folder, anything else is returned as is."""
    folder = SHIPPED_MODELS.get(name_or_path)
    if folder is None:
        return name_or_path
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{name_or_path} ships with dpt_peft, but {folder} holds no model.safetensors (an install without "
            "package data?). Reinstall dpt-peft, or rebuild the weights (a few minutes on 2 CPU cores) with "
            f"`python -m {REBUILT_BY[name_or_path]} --output_dir {folder}`."
        )
    return str(folder)


def recorded_name(name_or_path: str | None) -> str | None:
    """What an adapter records as its base model: a shipped model's id instead of the folder it was loaded from."""
    if name_or_path:
        for model_id, folder in SHIPPED_MODELS.items():
            if os.path.isdir(name_or_path) and Path(name_or_path).resolve() == folder:
                return model_id
    return name_or_path


def load_clip(model_name_or_path: str | None = None, **kwargs: Any) -> tuple[torch.nn.Module, Any]:
    """Base model and its image processor; `kwargs` go to `from_pretrained` (e.g. attn_implementation).

    Without a name, the toy CLIP of the embedded default. A shipped model keeps its id as `name_or_path`, so that
    adapters trained on it record no path of this machine. Models of a family without a backbone are refused here.
    """
    name = model_name_or_path or TOY_CLIP_ID
    path = resolve(name)
    model = AutoModel.from_pretrained(path, **kwargs)
    backbone_for(model)
    model.name_or_path = recorded_name(model.name_or_path)
    return model, AutoImageProcessor.from_pretrained(path)


def recorded_base(adapter: str | os.PathLike) -> str:
    """The base model an adapter was trained on, as its adapter_config.json records it."""
    base = DPTConfig.from_pretrained(str(adapter)).base_model_name_or_path
    if not base:
        raise ValueError(
            f"The adapter in {str(adapter)!r} records no base model (base_model_name_or_path is empty); pass the model "
            "it was trained on (--model_name_or_path, or model_name_or_path=)."
        )
    return base


def load_adapted_model(
    adapter: str,
    model_name_or_path: str | None = None,
    class_names: list[str] | None = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> tuple[PeftModel, Any]:
    """Base model + adapter in eval mode on `device` (default: CUDA when there is one), optionally with a new label
    space, and the image processor. The base model is the one the adapter records, unless `model_name_or_path`
    names another copy of it."""
    local_weights(adapter)  # an incomplete adapter folder is refused before the base model loads
    model, processor = load_clip(model_name_or_path or recorded_base(adapter), **kwargs)
    model = PeftModel.from_pretrained(model, adapter)
    if class_names:
        model.set_class_names(class_names)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), processor
