"""`transformers.CLIPModel` behind the backbone seam."""

from __future__ import annotations

import torch
from transformers import CLIPModel

from .base import Backbone


class ClipBackbone(Backbone):
    """CLIP: causal text tower pooled at the first end-of-text token, CLS-pooled vision tower, `logit_scale.exp()`."""

    model_class = CLIPModel
    family = "clip"
    causal_text = True
    num_prefix_tokens = 1  # CLS
    text_embeddings_key = "text_model.embeddings"
    vision_layer_key_format = "vision_model.encoder.layers.{}"

    @property
    def projection_dim(self) -> int:
        return self.model.config.projection_dim

    def pooled_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The first end-of-text token, or the largest id for legacy configs (`eos_token_id == 2`), as CLIP pools."""
        ids = input_ids.to(torch.int)
        eos_token_id = self.model.text_model.eos_token_id
        if eos_token_id == 2:
            return ids.argmax(dim=-1)
        return (ids == eos_token_id).int().argmax(dim=-1)

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.model.text_projection(pooled)

    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_text_features(input_ids=input_ids).pooler_output

    @property
    def text_parameter(self) -> torch.Tensor:
        return self.model.text_projection.weight

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()
