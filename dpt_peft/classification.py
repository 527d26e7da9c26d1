"""Classification with an adapter: class and image features, logits and the DPT loss (docs/method.md, 1-4).

`ClassificationMixin` is the half of `DPTModel` that runs a forward; `model.py` holds the half that injects and keeps
the adapters. It reaches the model only through the backbone seam, the label spaces and `forward_context`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .class_prompts import TaskClasses
from .config import DPTConfig
from .inputs import check_pixel_values, checked_labels
from .losses import class_aware_cross_entropy, guidance_loss
from .outputs import DPTOutput


class ClassificationMixin:
    """Class-side features (cached while nothing they depend on changed), image features, `classify`."""

    def _text_stamp(self) -> tuple:
        """What class features depend on besides the prompts: where and in which precision they were computed."""
        weight = self.backbone.text_parameter
        return (weight.device, weight.dtype, torch.is_autocast_enabled(weight.device.type))

    def zero_shot_text_features(
        self, task: str | None = None, adapter_name: str | None = None, classes: TaskClasses | None = None
    ) -> torch.Tensor:
        """Frozen text features of `zero_shot_template` for each class `[C, P]` (cached per class set)."""
        adapter_name = adapter_name or self._active
        classes = classes or self.task_classes(adapter_name, task)

        def compute() -> torch.Tensor:
            with self.forward_context(bypass=True):
                return self.encode_text(classes.template_ids, adapter_name=adapter_name)

        enabled = self.peft_config[adapter_name].cache_class_features
        with torch.no_grad():
            return self.feature_cache.get(
                (adapter_name, classes.names, "zero_shot"), self._text_stamp(), compute, enabled
            )

    def class_text_features(
        self, task: str | None = None, adapter_name: str | None = None, classes: TaskClasses | None = None
    ) -> torch.Tensor:
        """Text features of the class prompts with the learned context `[C, P]` (un-normalized)."""
        adapter_name = adapter_name or self._active
        classes = classes or self.task_classes(adapter_name, task)
        context = self.text_context(adapter_name)
        # After `disable_adapter_layers()` (PEFT's switch, held by the wrapped layers) classify as the base model.
        if classes.prompt_layout is None or context is None or self.backbone.text_embeddings.disable_adapters:
            return self.zero_shot_text_features(adapter_name=adapter_name, classes=classes)
        stamp = (*self._text_stamp(), context._version, context.data_ptr())
        return self.feature_cache.get(
            (adapter_name, classes.names, "learned"),
            stamp,
            lambda: self.encode_text(classes.prompt_layout.input_ids, classes.prompt_layout, adapter_name),
            self.peft_config[adapter_name].cache_class_features,
        )

    def label_space_for(self, class_names: list[str], adapter_name: str | None = None) -> TaskClasses:
        """A tokenized label space of other classes for one call (`classify(class_names=...)`): the adapter's own
        classes, config and auxiliary classifier stay as they are."""
        adapter_name = adapter_name or self._active
        config = self.peft_config[adapter_name]
        return self.label_spaces.for_call(adapter_name, config, class_names, self.text_context_length)

    # ------------------------------------------------------------------ image side and classification
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone.image_features(pixel_values)

    def zero_shot_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.forward_context(bypass=True):
            return self.image_features(pixel_values)

    def frozen_layer_inputs(
        self, pixel_values: torch.Tensor, layers: list[int], consume: Callable[[int, torch.Tensor], None]
    ) -> None:
        """Hand `consume(layer, tokens [B, N, D])` the tokens entering each of `layers` in the frozen, prompt-free
        CLIP (SPT's token pools), layer by layer, so no layer's tokens outlive their use."""
        with (
            torch.no_grad(),
            self.forward_context(bypass=True, capture_layers=frozenset(layers), on_layer_input=consume),
        ):
            self.image_features(pixel_values)

    def _scaled_cosine(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        return self.backbone.logits(images, texts)

    def classify(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        task: str | None = None,
        guidance: bool = False,
        output_zero_shot_logits: bool = False,
        output_attentions: bool = False,
        attention_classes: torch.Tensor | None = None,
        class_names: list[str] | None = None,
        zero_shot_image_features: torch.Tensor | None = None,
    ) -> DPTOutput:
        """Classify images over the active adapter's classes (docs/method.md, sections 1-4).

        `guidance=True` uses the general-knowledge-guidance loss of the reference's first epochs. `labels` index
        the task's class list. `attention_classes` (`[M]` class indices) reports in `class_aware_attentions` the
        attention that prompts built from those classes would have, instead of the top-K prompts' attention.
        `class_names` classifies over other classes for this call only (inference; `set_class_names` switches the
        adapter's label space for good). `zero_shot_image_features` are the frozen CLIP's features of these images
        when the caller has them already (an evaluation set seen before): exact, and one image pass cheaper.
        """
        adapter_name = self._active
        config: DPTConfig = self.peft_config[adapter_name]
        if class_names is not None and labels is not None:
            raise ValueError(
                "class_names classifies over other classes for one call, at inference; to train on other classes, "
                "switch the label space with set_class_names first."
            )
        if class_names is not None:
            classes = self.label_space_for(class_names, adapter_name)
        else:
            classes = self.task_classes(adapter_name, task)
        check_pixel_values(pixel_values)
        labels = checked_labels(labels, len(pixel_values), classes.num_classes) if labels is not None else None
        text = self.class_text_features(adapter_name=adapter_name, classes=classes)
        need_zero_shot = config.class_aware or guidance or output_zero_shot_logits
        zero_shot_logits = zero_shot_image = zero_shot_text = top_k = None
        if need_zero_shot:
            zero_shot_text = self.zero_shot_text_features(adapter_name=adapter_name, classes=classes)
            zero_shot_image = (
                self.zero_shot_image_features(pixel_values)
                if zero_shot_image_features is None
                else zero_shot_image_features.to(pixel_values.device)
            )
            zero_shot_logits = self._scaled_cosine(zero_shot_image, zero_shot_text)
        inputs: dict[str, Any] = {"record_attention": output_attentions}
        if config.class_aware:
            top_k = zero_shot_logits.topk(min(config.class_aware_top_k, classes.num_classes), dim=-1).indices
            inputs["class_features"] = text[top_k]
            if attention_classes is not None:
                probes = text[torch.as_tensor(attention_classes, device=text.device)]
                inputs["probe_class_features"] = probes.unsqueeze(0).expand(len(pixel_values), -1, -1)
        with self.forward_context(**inputs) as context:
            image = self.image_features(pixel_values)
        span = slice(classes.offset, classes.offset + classes.num_classes)
        # The auxiliary classifier belongs to the training label space: no auxiliary logits over other classes.
        own_classes = class_names is None
        class_aware_logits = tuple(logits[..., span] for logits in context.class_aware_logits) if own_classes else ()
        attentions = context.probe_attentions if attention_classes is not None else context.class_aware_attentions
        logits = self._scaled_cosine(image, text)

        loss = class_aware_loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if guidance:
                frozen_image_logits = self._scaled_cosine(zero_shot_image, text)
                loss = guidance_loss(logits, frozen_image_logits, self._scaled_cosine(image, zero_shot_text), labels)
            else:
                loss = F.cross_entropy(logits, labels)
            if class_aware_logits:
                class_aware_loss = class_aware_cross_entropy(class_aware_logits, top_k, labels)
                loss = loss + config.class_aware_loss_weight * class_aware_loss
        return DPTOutput(
            loss=loss,
            logits=logits,
            zero_shot_logits=zero_shot_logits,
            class_aware_logits=class_aware_logits or None,
            class_aware_indices=top_k,
            class_aware_loss=class_aware_loss,
            class_aware_attentions=tuple(attentions[i] for i in sorted(attentions)) or None,
            image_embeds=image,
            text_embeds=text,
        )
