"""`transformers.SiglipModel` (SigLIP, and the fixed-resolution SigLIP 2 checkpoints) behind the backbone seam.

What differs from CLIP, and why each answer is the one given here (docs/method.md, "DPT for SigLIP"):
- the text tower attends in both directions and pools the *last* position (a padding token) through its head, so
  prompts are padded to the full text context as SigLIP was trained (`padding="max_length"`, no attention mask)
  and the shared-prefix shortcut never applies;
- the vision tower has no CLS token: an attention-pooling head reads the final patch tokens. Visual prompts are
  dropped after every layer (VPT's convention, `VisionPromptLayer`), so the head pools patches only, as trained;
- logits are `exp(logit_scale) * cosine + logit_bias`, SigLIP's own; the bias is the same for every class, so the
  ranking and every cross-entropy over classes (DPT's loss, guidance, CAVPT's top-K) are unchanged by it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, SiglipModel

from ..utils.errors import UserInputError
from .base import Backbone, PromptFormat

PROBE_TEXT = "a"  # any text: what the tokenizer adds around it is how it frames every prompt


class SiglipBackbone(Backbone):
    """SigLIP: bidirectional text tower pooled at the last position, attention-pooled vision tower, biased logits."""

    model_class = SiglipModel
    family = "siglip"
    display_name = "SigLIP"
    causal_text = False
    num_prefix_tokens = 0  # no CLS: the vision tokens are the patches
    refused_models = {
        "Siglip2Model": (
            "SigLIP 2's NaFlex variant (Siglip2Model) takes patchified pixels with spatial_shapes and a "
            "pixel_attention_mask, which DPT's forward (pixel_values [B, 3, H, W]) and its visual prompts (they would "
            "need their own rows in that mask) do not carry. Use a fixed-resolution SigLIP 2 checkpoint "
            "(google/siglip2-*-patch16-224 and the like, which load as SiglipModel) or a SigLIP one."
        ),
    }

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if not model.config.vision_config.vision_use_head:
            raise UserInputError(
                "This SigLIP has no vision pooling head (vision_use_head=False), so it gives no image feature to "
                "compare with text; load a SigLIP checkpoint with its head."
            )

    @property
    def projection_dim(self) -> int:
        return self.model.config.text_config.projection_size  # the text head's output: the joint space

    def pooled_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """SigLIP pools the last position whatever token it holds (prompts are padded to the context)."""
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.model.text_model.head(pooled)

    @property
    def text_parameter(self) -> torch.Tensor:
        return self.model.text_model.head.weight

    def prompt_format(self, tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
        """The framing the tokenizer itself adds (SiglipTokenizer: `</s>` after; Gemma's: as configured), padded to
        the context with its pad token, so class prompts are exactly `tokenizer(text, padding="max_length")`."""
        bare = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        framed = tokenizer(PROBE_TEXT)["input_ids"]
        start = next(i for i in range(len(framed)) if framed[i : i + len(bare)] == bare)
        before, after = framed[:start], framed[start + len(bare) :]
        end_id = after[-1] if after else tokenizer.eos_token_id
        if end_id is None:
            raise UserInputError(
                f"The tokenizer {type(tokenizer).__name__} adds no end token and has no eos_token; DPT needs one to "
                "end each class prompt. Load the base model's own tokenizer (tokenizer_name_or_path)."
            )
        pad_id = end_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
        return PromptFormat(before[0] if before else None, end_id, pad_id, True)

    def logits(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """SigLIP's own logits: the scaled cosine plus `logit_bias` (sigmoid of them is SigLIP's match probability)."""
        return super().logits(images, texts) + self.model.logit_bias.to(images.dtype)
