"""`transformers.CLIPModel` behind the backbone seam."""

from __future__ import annotations

import torch
from transformers import CLIPModel

from .base import Backbone


class ClipBackbone(Backbone):
    """CLIP: causal text tower pooled at the first end-of-text token, CLS-pooled vision tower, `logit_scale.exp()`."""

    model_class = CLIPModel
    family = "clip"
    display_name = "CLIP"
    causal_text = True
    num_prefix_tokens = 1  # CLS

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

    @property
    def text_parameter(self) -> torch.Tensor:
        return self.model.text_projection.weight
