"""`Backbone`: what DPT needs to know about a dual-encoder family, asked through one object instead of module paths."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class PromptFormat:
    """How a family frames and pads a tokenized prompt, so the class-prompt layouts need not know the family."""

    start_id: int | None  # token before every prompt (CLIP's start-of-text); None where the family puts none
    end_id: int  # token after every prompt; its position is the one pooled (CLIP's end-of-text)
    pad_id: int  # token that fills prompts up to a common length
    pad_to_context: bool  # pad every prompt to the text context length (how a bidirectional tower was trained)


def _unwrapped(module: nn.Module) -> nn.Module:
    """The family's own module, also when DPT has wrapped it (a tuner layer keeps it as `base_layer`)."""
    return getattr(module, "base_layer", module)


class Backbone(ABC):
    """One dual-encoder family behind the seam; built around the (possibly already wrapped) base model.

    Subclasses name their model class and say how text is pooled and projected. The defaults are what transformers'
    dual encoders (CLIP, SigLIP) share: `text_model` / `vision_model` towers, `get_text_features` and
    `get_image_features`, and `exp(logit_scale)` times the cosine; a family that differs overrides them.
    """

    model_class: ClassVar[type[nn.Module]]
    family: ClassVar[str]  # recorded in adapters and model cards
    display_name: ClassVar[str]  # the family as people write it, in messages ("CLIP", "SigLIP")
    causal_text: ClassVar[bool]  # causal text attention: tokens after the pooled one never change it (exact cuts)
    num_prefix_tokens: ClassVar[int]  # vision tokens before the patch tokens (CLIP's CLS)
    text_embeddings_key: ClassVar[str] = "text_model.embeddings"  # where the learned context goes in
    vision_layer_key_format: ClassVar[str] = "vision_model.encoder.layers.{}"  # vision layer i, with `{}` for i
    # Model classes of this family DPT cannot adapt (class name -> why, and what to load instead): refused by name.
    refused_models: ClassVar[dict[str, str]] = {}

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # ------------------------------------------------------------------ shape
    @property
    @abstractmethod
    def projection_dim(self) -> int:
        """Width of the joint image-text space."""

    @property
    def shape(self) -> dict[str, int]:
        """Widths and depth an adapter is made for (checked when an adapter is loaded into another base model)."""
        config = self.model.config
        return {
            "vision_hidden_size": config.vision_config.hidden_size,
            "vision_num_layers": config.vision_config.num_hidden_layers,
            "text_hidden_size": config.text_config.hidden_size,
            "projection_dim": self.projection_dim,
        }

    @property
    def text_context_length(self) -> int:
        """Positions of the text encoder: the longest prompt it can encode."""
        return self.model.config.text_config.max_position_embeddings

    @property
    def num_vision_layers(self) -> int:
        return self.shape["vision_num_layers"]

    def vision_layer_key(self, index: int) -> str:
        return self.vision_layer_key_format.format(index)

    # ------------------------------------------------------------------ text tower
    @property
    def text_embeddings(self) -> nn.Module:
        """The text embeddings module as it sits in the model now (wrapped by DPT or not)."""
        return self.model.get_submodule(self.text_embeddings_key)

    @property
    def token_embedding(self) -> nn.Embedding:
        return _unwrapped(self.text_embeddings).token_embedding

    @property
    def position_embedding(self) -> nn.Embedding:
        return _unwrapped(self.text_embeddings).position_embedding

    @property
    def text_layers(self) -> nn.ModuleList:
        """The text encoder's layers, in order (pre-LayerNorm transformer layers, `text_model.encoder.layers` in
        transformers' dual encoders)."""
        return self.model.text_model.encoder.layers

    def final_text_norm(self, pooled: torch.Tensor) -> torch.Tensor:
        """The text tower's last normalization, applied to the pooled hidden state."""
        return self.model.text_model.final_layer_norm(pooled)

    @abstractmethod
    def pooled_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The position the text tower pools for each prompt `[C]`."""

    @abstractmethod
    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled, normalized text hidden states `[C, E]` to the joint space `[C, P]`."""

    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Joint-space features `[C, P]` of token ids through the whole text tower (with whatever DPT wrapped); no
        attention mask: a causal tower never looks past the pooled token, and SigLIP was trained attending to its
        padding."""
        return self.model.get_text_features(input_ids=input_ids).pooler_output

    @property
    @abstractmethod
    def text_parameter(self) -> torch.Tensor:
        """A text-side weight whose device and dtype are the text features' (cache stamps, input placement)."""

    def prompt_format(self, tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
        """How this family frames prompts with `tokenizer` (CLIP: start and end of text, padded with end)."""
        return PromptFormat(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.eos_token_id, False)

    # ------------------------------------------------------------------ vision tower and the joint space
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Joint-space image features `[B, P]` (with whatever DPT wrapped in the vision layers)."""
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def patch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The patch tokens of a vision layer's tokens `[B, N, D]` (prefix tokens such as CLS removed)."""
        return tokens[:, self.num_prefix_tokens :]

    def logit_scale(self) -> torch.Tensor:
        """The learned temperature as the multiplier of cosine similarities."""
        return self.model.logit_scale.exp()

    def logits(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """Class logits `[B, C]`: scaled cosine similarity of image and text features, as the family scores them."""
        images = images / images.norm(dim=-1, keepdim=True)
        texts = texts / texts.norm(dim=-1, keepdim=True)
        return self.logit_scale() * images @ texts.t().to(images.dtype)
