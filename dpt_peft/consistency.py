"""Keeping what CLIP knew (docs/method.md, section 10): PromptSRC's self-consistency terms and the zero-shot ensemble.

Self-consistency (Khattak et al., ICCV 2023, https://arxiv.org/abs/2307.06948; muzairkhattak/PromptSRC,
`trainers/promptsrc.py`) ties the tuned model to the frozen one during training with three terms, each with its weight
(`DPTConfig.consistency_weights`): the L1 distance of the prompted to the frozen image features, of the learned to the
frozen class features (averaged over templates), and the KL divergence of the prompted logits from the zero-shot ones.
The zero-shot ensemble (`DPTConfig.zero_shot_ensemble`) mixes the adapter's class probabilities with the frozen
zero-shot classifier's at inference. The tuner hands these functions the tensors its forward already has.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from .backbones import PromptFormat
from .class_prompts import build_template_ids

# PromptSRC's text targets: CLIP's ImageNet prompt-engineering templates (openai/CLIP,
# notebooks/Prompt_Engineering_for_ImageNet.ipynb), the 60 of PromptSRC's `trainers/imagenet_templates.py`
# (`IMAGENET_TEMPLATES`), used there for every dataset. Opt-in: `DPTConfig(consistency_templates=PROMPTSRC_TEMPLATES)`.
PROMPTSRC_TEMPLATES = (
    *("a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}."),
    *("a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}."),
    *("graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}."),
    *("the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}."),
    *("a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}."),
    *("the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}."),
    *("a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}."),
    *("a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}."),
    *("a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}."),
    *("a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}."),
    *("a close-up photo of the {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}."),
    *("a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.", "the toy {}."),
    *("a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}."),
    *("a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}."),
    *("art of a {}.", "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}."),
)
# The keys of `DPTOutput.loss_terms` (what the training loop logs): the classification loss, CAVPT's, and these.
IMAGE_TERM, TEXT_TERM, LOGITS_TERM = "consistency_image", "consistency_text", "consistency_logits"


def consistency_on(weights: tuple[float, float, float] | None) -> bool:
    """Whether any term counts: `None` and all-zero weights leave the loss (and what a forward computes) as DPT's."""
    return weights is not None and any(weight > 0 for weight in weights)


def _unit(features: torch.Tensor) -> torch.Tensor:
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True)


def consistency_terms(
    weights: tuple[float, float, float],
    image: torch.Tensor,
    frozen_image: torch.Tensor,
    text: torch.Tensor,
    frozen_text: torch.Tensor,
    logits: torch.Tensor,
    frozen_logits: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """PromptSRC's terms, each times its weight (only those with a weight above 0), in float32.

    - image: mean |norm(image) - norm(frozen_image)| over `[B, P]` (prompted vs frozen image features);
    - text: mean |norm(text) - norm(frozen_text)| over `[C, P]` (learned vs frozen class features);
    - logits: KL(softmax(frozen_logits) || softmax(logits)), summed and divided by `B * C`, temperature 1.

    PromptSRC: `trainers/promptsrc.py`, `PromptSRC.forward_backward` (lines 300-311) and `CustomCLIP.forward`
    (lines 193-205, the normalized features and the zero-shot logits).
    """
    image_weight, text_weight, logits_weight = weights
    terms = {}
    if image_weight > 0:
        terms[IMAGE_TERM] = image_weight * F.l1_loss(_unit(image), _unit(frozen_image))
    if text_weight > 0:
        terms[TEXT_TERM] = text_weight * F.l1_loss(_unit(text), _unit(frozen_text))
    if logits_weight > 0:
        log_p, log_q = F.log_softmax(logits.float(), dim=-1), F.log_softmax(frozen_logits.float(), dim=-1)
        divergence = F.kl_div(log_p, log_q, reduction="sum", log_target=True) / logits.numel()
        terms[LOGITS_TERM] = logits_weight * divergence
    return terms


def ensemble_logits(logits: torch.Tensor, zero_shot_logits: torch.Tensor, weight: float) -> torch.Tensor:
    """`log(weight * softmax(logits) + (1 - weight) * softmax(zero_shot_logits))`, in the logits' dtype: its argmax
    and softmax are the mixture's (probabilities over the label space, for SigLIP too: its bias cancels)."""
    log_weights = torch.tensor([weight, 1.0 - weight], device=logits.device).log()  # log(0) = -inf drops a side
    adapter = F.log_softmax(logits.float(), dim=-1) + log_weights[0]
    zero_shot = F.log_softmax(zero_shot_logits.float(), dim=-1) + log_weights[1]
    return torch.logaddexp(adapter, zero_shot).to(logits.dtype)


def consistency_template_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: PromptFormat,
    class_names: list[str],
    templates: list[str],
    max_length: int,
    pad_to_context: bool,
) -> list[torch.Tensor]:
    """Token ids `[C, T]` of every class in each template, framed and padded as the zero-shot classifier's."""
    pad_to = max_length if pad_to_context or prompt_format.pad_to_context else None
    field = "consistency_templates"
    return [build_template_ids(tokenizer, prompt_format, class_names, t, max_length, pad_to, field) for t in templates]
