"""DPT's losses (docs/method.md, sections 4 and 10): the joint loss, the guidance loss, the auxiliary CAVPT loss, and
PromptSRC's self-consistency terms added to them (`training_loss`, the one composition a forward uses)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backbones import Backbone
from .config import DPTConfig
from .consistency import consistency_on, consistency_terms

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


@dataclass
class ForwardTensors:
    """What one forward computed that its loss reads; the frozen model's parts are None where it did not run."""

    image: torch.Tensor  # prompted image features [B, P]
    text: torch.Tensor  # learned class features [C, P]
    logits: torch.Tensor  # [B, C]
    zero_shot_image: torch.Tensor | None = None  # frozen image features [B, P]
    zero_shot_text: torch.Tensor | None = None  # frozen class features of zero_shot_template [C, P]
    zero_shot_logits: torch.Tensor | None = None
    class_aware_logits: tuple[torch.Tensor, ...] = ()
    top_k: torch.Tensor | None = None
    consistency_text: torch.Tensor | None = None  # the frozen class features the consistency terms aim at [C, P]


def training_loss(
    backbone: Backbone, config: DPTConfig, tensors: ForwardTensors, labels: torch.Tensor, guidance: bool
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor] | None]:
    """The loss of a forward with labels, the unweighted CAVPT loss, and, with self-consistency on, each weighted part
    of the loss (detached; they add up to it): `cross_entropy` (or `guidance`), `class_aware`, `consistency_*`.

    Self-consistency applies in both phases, guidance epochs included: PromptSRC has no guidance phase, and its terms
    pull towards the same frozen model the guidance loss learns against."""
    t, labels = tensors, labels.to(tensors.logits.device)
    if guidance:
        frozen_image_logits = backbone.logits(t.zero_shot_image, t.text)
        loss = guidance_loss(t.logits, frozen_image_logits, backbone.logits(t.image, t.zero_shot_text), labels)
    else:
        loss = F.cross_entropy(t.logits, labels)
    parts = {"guidance" if guidance else "cross_entropy": loss}
    class_aware_loss = None
    if t.class_aware_logits:
        class_aware_loss = class_aware_cross_entropy(t.class_aware_logits, t.top_k, labels)
        parts["class_aware"] = config.class_aware_loss_weight * class_aware_loss
        loss = loss + parts["class_aware"]
    if not consistency_on(config.consistency_weights):
        return loss, class_aware_loss, None
    target_logits = t.zero_shot_logits
    if t.consistency_text is not t.zero_shot_text:  # a template ensemble: its own zero-shot logits, as PromptSRC's
        target_logits = backbone.logits(t.zero_shot_image, t.consistency_text)
    terms = consistency_terms(
        config.consistency_weights, t.image, t.zero_shot_image, t.text, t.consistency_text, t.logits, target_logits
    )
    for term in terms.values():
        loss = loss + term
    return loss, class_aware_loss, {name: part.detach() for name, part in {**parts, **terms}.items()}
