"""The backbone seam: where a dual-encoder family keeps what DPT touches, one small module per family.

The tuner, the shared-prefix text path, SPT and the inspection tools ask a `Backbone` for the text embeddings, the
text layers, the vision layers, how features are pooled, projected and compared, and how class prompts are framed
and padded; none of them names a family's module paths. A new family is one module here with a `Backbone` subclass
added to `BACKBONES`.
"""

from __future__ import annotations

from torch import nn

from ..utils.errors import UserInputError
from .base import Backbone, PromptFormat
from .clip import ClipBackbone
from .siglip import SiglipBackbone

BACKBONES: tuple[type[Backbone], ...] = (ClipBackbone, SiglipBackbone)


class UnsupportedModelError(UserInputError, TypeError):
    """A base model of a family DPT has no backbone for (a `TypeError`, as for any argument of the wrong type)."""


def backbone_for(model: nn.Module) -> Backbone:
    """The seam of `model`'s family; a clear error naming the supported classes for any other model."""
    for backbone in BACKBONES:
        if isinstance(model, backbone.model_class):
            return backbone(model)
        if type(model).__name__ in backbone.refused_models:
            raise UnsupportedModelError(backbone.refused_models[type(model).__name__])
    supported = " or ".join(f"transformers.{b.model_class.__name__}" for b in BACKBONES)
    loaders = " or ".join(f"{b.model_class.__name__}.from_pretrained(...)" for b in BACKBONES)
    raise UnsupportedModelError(
        f"DPT adapts a {supported} (a dual-encoder image-text model), got {type(model).__name__}; load the base "
        f"model with its family's own class, {loaders}."
    )


__all__ = [
    "BACKBONES",
    "Backbone",
    "ClipBackbone",
    "PromptFormat",
    "SiglipBackbone",
    "UnsupportedModelError",
    "backbone_for",
]
