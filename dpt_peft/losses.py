"""DPT's losses (docs/method.md, section 4): the joint loss, the guidance loss and the auxiliary CAVPT loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

GUIDANCE_JOINT_WEIGHT = 0.1  # weight of the joint loss during general-knowledge guidance (reference value)


def guidance_loss(
    joint_logits: torch.Tensor,
    frozen_image_logits: torch.Tensor,
    frozen_text_logits: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """The first epochs' loss: text prompts learn against frozen image features (`frozen_image_logits`), visual
    prompts against the frozen zero-shot classifier (`frozen_text_logits`), plus a little of the joint loss."""
    return (
        F.cross_entropy(frozen_image_logits, labels)
        + F.cross_entropy(frozen_text_logits, labels)
        + GUIDANCE_JOINT_WEIGHT * F.cross_entropy(joint_logits, labels)
    )


def class_aware_cross_entropy(
    layer_logits: tuple[torch.Tensor, ...], top_k: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Auxiliary CAVPT loss: cross-entropy of every (layer, prompt) whose selected class is the image's label.

    Images whose label is not among their top-K classes add nothing; with no such prompt at all the loss
    is 0 (and still part of the graph, which DDP needs).
    """
    logits = torch.stack(layer_logits, dim=1)  # [B, layers, K, C]
    matches = (top_k == labels.unsqueeze(1)).unsqueeze(1).expand(-1, logits.shape[1], -1)  # [B, layers, K]
    if not matches.any():
        return logits.sum() * 0.0
    targets = labels.view(-1, 1, 1).expand_as(matches)
    return F.cross_entropy(logits[matches].float(), targets[matches])
