"""What an adapter learned: class-aware attention maps and the words nearest to the learned context."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from PIL import Image

from .inference import ImageInput, _load, _to_pixel_values, image_processor_for
from .layer import VisionPromptLayer


@dataclass
class AttentionMap:
    class_name: str
    layer: int
    weights: torch.Tensor  # [grid_h, grid_w], sums to 1 over the patches


def _class_aware_layers(model, adapter: str) -> list[VisionPromptLayer]:
    layers = [m for m in model.modules() if isinstance(m, VisionPromptLayer) and adapter in m.dpt_class_aware]
    if not layers:
        raise ValueError(
            f"Adapter {adapter!r} has no class-aware prompts (class_aware=False), so there is no class-aware "
            "attention to show; train with class_aware=True."
        )
    return layers


def class_aware_attention(
    model,
    image: ImageInput,
    class_name: str,
    layer: Optional[int] = None,
    task: Optional[str] = None,
    processor=None,
) -> AttentionMap:
    """Attention of the class-aware prompt built from `class_name` over the image's patches (METHOD.md 3, step 4).

    The prompt's query is the class's learned text feature; its keys are the tokens entering the class-aware
    layer during the image's real forward. CLS and the learned key/value tokens are left out and the patch
    weights renormalized to sum to 1. `layer` is a vision layer index (default: the first class-aware layer).
    """
    adapter = model.active_adapter
    names = model.class_names(task)
    if class_name not in names:
        raise ValueError(f"Class {class_name!r} is not in the adapter's label space {names}.")
    layers = _class_aware_layers(model, adapter)
    chosen = layers[0] if layer is None else next((m for m in layers if m.layer_index == layer), None)
    if chosen is None:
        raise ValueError(f"Vision layer {layer} has no class-aware prompts; those layers are "
                         f"{[m.layer_index for m in layers]}.")
    processor = processor if processor is not None or isinstance(image, torch.Tensor) else image_processor_for(model)
    pixel_values = _to_pixel_values([_load(image, 0)[1]], processor)
    device = next(model.parameters()).device
    captured = {}

    def keep_tokens(module, args) -> None:  # the last call is the prompted pass (the zero-shot pass runs first)
        captured["tokens"] = args[0]

    hook = chosen.register_forward_pre_hook(keep_tokens)
    try:
        with torch.no_grad():
            model.eval()
            model(pixel_values=pixel_values.to(device), task=task)
            features = model.base_model.class_text_features(task)[names.index(class_name)]
            _, _, attention = chosen.dpt_class_aware[adapter](features.view(1, 1, -1), captured["tokens"])
    finally:
        hook.remove()
    num_tokens = captured["tokens"].shape[1]
    patches = attention[0, 0, 1:num_tokens].float()
    side = math.isqrt(patches.numel())
    return AttentionMap(class_name, chosen.layer_index, (patches / patches.sum()).view(side, side).cpu())


def save_attention_figure(image: Image.Image, maps: list[AttentionMap], path: str, title: str = "") -> None:
    """The image, then each class's attention upsampled onto it, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(maps) + 1, figsize=(2.6 * (len(maps) + 1), 2.9))
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    for axis, attention in zip(axes[1:], maps):
        upsampled = F.interpolate(attention.weights[None, None], size=image.size[::-1], mode="bilinear",
                                  align_corners=False)[0, 0]
        axis.imshow(image)
        axis.imshow(upsampled.numpy(), cmap="jet", alpha=0.5)
        axis.set_title(f"{attention.class_name} (layer {attention.layer})", fontsize=9)
    for axis in axes:
        axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def nearest_context_tokens(model, k: int = 3, adapter: Optional[str] = None) -> list[list[tuple[str, float]]]:
    """For each learned context vector, the `k` vocabulary tokens nearest by cosine similarity (as CoOp reports).

    For a class-specific context, the vectors of the first class are listed.
    """
    tuner = model.base_model
    adapter = adapter or model.active_adapter
    embeddings = tuner.model.text_model.embeddings
    if adapter not in getattr(embeddings, "dpt_context", {}):
        raise ValueError(f"Adapter {adapter!r} learns no text context (learn_text_context=False).")
    context = embeddings.dpt_context[adapter].detach()
    context = context[0] if context.dim() == 3 else context
    vocabulary = embeddings.base_layer.token_embedding.weight.detach()
    similarity = F.normalize(context.float(), dim=-1) @ F.normalize(vocabulary.float(), dim=-1).t()
    scores, ids = similarity.topk(k, dim=-1)
    tokenizer = tuner._tokenizers[adapter]
    return [
        [(tokenizer.convert_ids_to_tokens(i).replace("</w>", ""), s) for i, s in zip(row_ids, row_scores)]
        for row_ids, row_scores in zip(ids.tolist(), scores.tolist())
    ]
