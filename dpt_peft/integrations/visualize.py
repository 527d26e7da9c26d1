"""What an adapter learned: class-aware attention maps and the words nearest to the learned context."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..peft_model import DPTPeftModel
from ..utils.errors import UserInputError
from .inference import ImageInput, image_processor_for, load_image, to_pixel_values


@dataclass
class AttentionMap:
    class_name: str
    layer: int
    weights: torch.Tensor  # [grid_h, grid_w], sums to 1 over the patches


def class_aware_attention(
    model: DPTPeftModel,
    image: ImageInput,
    class_name: str,
    layer: int | None = None,
    task: str | None = None,
    processor=None,
) -> AttentionMap:
    """Attention of the class-aware prompt built from `class_name` over the image's patches (docs/method.md,
    section 3).

    The prompt's query is the class's learned text feature; its keys are the tokens entering the class-aware
    layer during the image's real forward (the forward's `attention_classes`). CLS and the learned key/value
    tokens are left out and the patch weights renormalized to sum to 1. `layer` is a vision layer index
    (default: the first class-aware layer).
    """
    names = model.class_names(task)
    if class_name not in names:
        raise UserInputError(f"Class {class_name!r} is not in the adapter's label space {names}.")
    layers = model.class_aware_layers()
    if not layers:
        raise UserInputError(
            f"Adapter {model.active_adapter!r} has no class-aware prompts (class_aware=False), so there is no "
            "class-aware attention to show; train with class_aware=True."
        )
    chosen = layers[0] if layer is None else layer
    if chosen not in layers:
        raise UserInputError(f"Vision layer {layer} has no class-aware prompts; those layers are {layers}.")
    processor = processor if processor is not None or isinstance(image, torch.Tensor) else image_processor_for(model)
    pixel_values = to_pixel_values([load_image(image, 0)[1]], processor)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        output = model(pixel_values=pixel_values.to(device), task=task, attention_classes=[names.index(class_name)])
    attention = output.class_aware_attentions[layers.index(chosen)][0, 0].float()
    num_kv_tokens = model.peft_config[model.active_adapter].class_aware_num_kv_tokens
    first_patch = model.backbone.num_prefix_tokens  # CLS (CLIP) first, learned key/value tokens last
    patches = attention[first_patch : attention.shape[0] - num_kv_tokens]
    side = math.isqrt(patches.numel())
    return AttentionMap(class_name, chosen, (patches / patches.sum()).view(side, side).cpu())


def nearest_context_tokens(
    model: DPTPeftModel, k: int = 3, adapter: str | None = None
) -> list[list[tuple[str, float]]]:
    """For each learned context vector, the `k` vocabulary tokens nearest by cosine similarity (as CoOp reports).

    For a class-specific context, the vectors of the first class are listed.
    """
    adapter = adapter or model.active_adapter
    context = model.text_context(adapter)
    if context is None:
        raise UserInputError(f"Adapter {adapter!r} learns no text context (learn_text_context=False).")
    context = context.detach()
    context = context[0] if context.dim() == 3 else context
    vocabulary = model.token_embedding().weight.detach()
    similarity = F.normalize(context.float(), dim=-1) @ F.normalize(vocabulary.float(), dim=-1).t()
    scores, ids = similarity.topk(k, dim=-1)
    tokenizer = model.tokenizer(adapter)
    return [
        [(tokenizer.convert_ids_to_tokens(i).replace("</w>", ""), s) for i, s in zip(row_ids, row_scores)]
        for row_ids, row_scores in zip(ids.tolist(), scores.tolist())
    ]
