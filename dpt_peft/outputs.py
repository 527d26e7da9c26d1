"""Output of a DPT forward.

By default every output but the scalar losses (and their named parts) is batch-first (or absent), so transformers'
Trainer can concatenate what it gathers over batches; `text_embeds`, the class features without a batch dimension,
come only when asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


@dataclass
class DPTOutput(ModelOutput):
    """
    Args:
        loss (`torch.Tensor`, *optional*): Training loss when `labels` are given (DPT or guidance loss, plus the
            weighted class-aware auxiliary loss).
        logits (`torch.Tensor` of shape `[batch, num_classes]`): Scaled cosine similarities of the prompted image
            features with the prompted class features.
        zero_shot_logits (`torch.Tensor`, *optional*): Plain CLIP logits with `zero_shot_template`; present when
            they were needed (class-aware prompts, guidance) or asked for.
        class_aware_logits (`tuple[torch.Tensor]`, *optional*): Per class-aware layer, the auxiliary logits
            `[batch, top_k, num_classes]` of each class-aware prompt.
        class_aware_indices (`torch.Tensor`, *optional*): `[batch, top_k]` classes each image's prompts were built from.
        class_aware_loss (`torch.Tensor`, *optional*): The unweighted auxiliary loss.
        class_aware_attentions (`tuple[torch.Tensor]`, *optional*): Per class-aware layer, attention
            `[batch, top_k, tokens + kv_tokens]` of each prompt over CLS, patches and the learned key/value tokens.
        image_embeds (`torch.Tensor`): Prompted image features `[batch, projection_dim]` (un-normalized).
        text_embeds (`torch.Tensor`, *optional*): Class features `[num_classes, projection_dim]` (un-normalized);
            only with `output_text_embeds=True`, being the one output without a batch dimension.
        loss_terms (`dict[str, torch.Tensor]`, *optional*): Each weighted part of `loss` as a detached scalar (they add
            up to it): `cross_entropy` (or `guidance` in guidance epochs), `class_aware` with CAVPT, and the
            `consistency_image`, `consistency_text`, `consistency_logits` terms with a weight above 0; present only when
            `consistency_weights` are on and labels are given.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    zero_shot_logits: torch.Tensor | None = None
    class_aware_logits: tuple[torch.Tensor, ...] | None = None
    class_aware_indices: torch.Tensor | None = None
    class_aware_loss: torch.Tensor | None = None
    class_aware_attentions: tuple[torch.Tensor, ...] | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    loss_terms: dict[str, torch.Tensor] | None = None
