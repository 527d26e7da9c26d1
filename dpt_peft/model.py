"""`DPTModel`: the PEFT tuner that wires DPT's prompts into a `transformers.CLIPModel` and classifies with them.

It owns two components and hands them what they need: `LabelSpaces` (each adapter's tokenized classes) and
`ClassFeatures` (their text features, cached where exact). The image side, the forward context and the loss are here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from transformers import PreTrainedTokenizerBase

from .backbones import Backbone, backbone_for
from .class_features import ClassFeatures
from .class_prompts import TaskClasses
from .config import DPTConfig
from .consistency import consistency_on, ensemble_logits
from .inputs import check_pixel_values, checked_labels
from .label_space import LabelSpaces
from .layer import (
    MERGE_REFUSAL,
    ClassAwarePromptGenerator,
    DPTLayer,
    ForwardContext,
    ForwardContextSlot,
    ParameterKind,
    TextContextEmbeddings,
    VisionPromptLayer,
)
from .losses import ForwardTensors, training_loss
from .outputs import DPTOutput
from .sources import fit_to_shipped_model, recorded_name
from .transfer import copy_shared_tensors, shared_source_tensors
from .utils.errors import UserInputError


class DPTModel(BaseTuner):
    """Dual-modality Prompt Tuning of a frozen CLIP (https://arxiv.org/abs/2208.08340).

    Wraps the text embeddings (learned context) and the vision encoder layers that carry prompts (deep and
    class-aware), wherever the model's `Backbone` says they are. Use it through
    `get_peft_model(clip, DPTConfig(...))`, whose forward (`DPTPeftModel.forward`) calls [`DPTModel.classify`].

    Example:

        ```py
        >>> import dpt_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(clip, dpt_peft.DPTConfig(class_names=["cat", "dog"]))
        >>> model(pixel_values=pixel_values, labels=labels).loss
        ```
    """

    prefix: str = "dpt_"
    tuner_layer_cls = DPTLayer
    # The label space, tokenizer, forward context and class features live on this tuner, and only
    # DPTPeftModel.forward classifies with them: peft's inject_adapter_in_model (and transformers' load_adapter,
    # which calls it) refuse such tuners, instead of returning a CLIP whose prompts are silently half applied.
    uses_shared_state: bool = True
    target_module_mapping: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ injection
    def _pre_injection_hook(self, model: nn.Module, config: DPTConfig, adapter_name: str) -> None:
        self.backbone: Backbone = backbone_for(model)
        self._slot = ForwardContextSlot()
        self.label_spaces = LabelSpaces()
        self.class_features = ClassFeatures(self.backbone, self._slot)

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        """Validate everything against the base model first, so a bad config leaves the CLIP untouched."""
        config: DPTConfig = self.peft_config[adapter_name]
        fit_to_shipped_model(config, self.model.name_or_path)
        config.validate_for_model(self.backbone)
        tokenizer = self.label_spaces.load_tokenizer(config, self.model.name_or_path, self.backbone.display_name)
        prompt_format = self.backbone.prompt_format(tokenizer)
        classes = LabelSpaces.tokenize(config, tokenizer, prompt_format, self.text_context_length)
        sources = shared_source_tensors(config.init_from) if config.init_from else None
        for key, value in {**self.backbone.shape, "base_model_family": self.backbone.family}.items():  # checks passed
            setattr(config, key, value)
        config.base_model_name_or_path = recorded_name(config.base_model_name_or_path)
        self.label_spaces.add(adapter_name, tokenizer, prompt_format, classes)
        try:
            super().inject_adapter(model, adapter_name, **kwargs)
        except Exception:
            self._forget(adapter_name)
            raise
        if sources is not None:
            try:
                copy_shared_tensors(self.adapter_parameters(adapter_name), sources)
            except ValueError:
                self._roll_back_injection(adapter_name)
                raise
            # Applied once, at creation: the saved adapter holds the result, so loading it never needs the sources.
            config.initialized_from, config.init_from = config.init_from, None

    def _roll_back_injection(self, adapter_name: str) -> None:
        """Remove an adapter that was injected but could not be initialized; the first one leaves no wrapper."""
        if len(self.peft_config) == 1:
            self.unload()
        else:
            BaseTuner.delete_adapter(self, adapter_name)
        self._forget(adapter_name)

    @property
    def text_context_length(self) -> int:
        """Positions of the text encoder: the longest prompt it can encode."""
        return self.backbone.text_context_length

    def _prepare_adapter_config(self, config: DPTConfig, model_config: dict) -> DPTConfig:
        return config  # targets come from the prompt settings (see `_target_keys`), not from `target_modules`

    def _check_target_module_exists(self, config: DPTConfig, key: str) -> bool:
        return key in self._target_keys(config)

    def _target_keys(self, config: DPTConfig) -> set[str]:
        text = {self.backbone.text_embeddings_key} if config.learn_text_context else set()
        return set(self._vision_targets(config)) | text

    def _vision_targets(self, config: DPTConfig) -> dict[str, int]:
        """Module path -> index of every vision layer that carries prompts of `config`."""
        num_layers = self.backbone.num_vision_layers
        layers = set(config.visual_prompt_layers(num_layers)) | set(config.class_aware_layers(num_layers))
        return {self.backbone.vision_layer_key(i): i for i in sorted(layers)}

    def _create_and_replace(
        self,
        config: DPTConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs,
    ) -> None:
        if current_key == self.backbone.text_embeddings_key:
            module = self._wire_text_context(config, adapter_name, target)
        else:
            module = self._wire_vision_layer(config, adapter_name, target, self._vision_targets(config)[current_key])
        if module is not target:
            setattr(parent, target_name, module)
        module.move_to_base_layer_device(adapter_name)  # skips meta tensors (low_cpu_mem_usage)

    def _wire_text_context(self, config: DPTConfig, adapter_name: str, target: nn.Module) -> TextContextEmbeddings:
        """The learned context (docs/method.md, section 1): the phrase's embeddings, or random normal."""
        module = target if isinstance(target, TextContextEmbeddings) else TextContextEmbeddings(target, self._slot)
        token_embedding = module.token_embedding
        num_rows = self.label_spaces.num_classes(adapter_name) if config.class_specific_context else 1
        if config.text_init is not None:
            ids = torch.tensor(self.label_spaces.context_init_ids(adapter_name, config.text_init))
            with torch.no_grad():
                context = token_embedding(ids.to(token_embedding.weight.device)).float()
            context = context.unsqueeze(0).expand(num_rows, -1, -1)
        else:
            width = token_embedding.weight.shape[1]
            context = torch.randn(num_rows, config.num_text_tokens, width) * config.prompt_init_std
        module.update_layer(adapter_name, context if config.class_specific_context else context[0])
        return module

    def _wire_vision_layer(
        self, config: DPTConfig, adapter_name: str, target: nn.Module, index: int
    ) -> VisionPromptLayer:
        """Deep prompts (section 2) and/or a class-aware prompt generator (section 3) of one vision layer."""
        module = target if isinstance(target, VisionPromptLayer) else VisionPromptLayer(target, self._slot, index)
        num_layers, hidden = config.vision_num_layers, config.vision_hidden_size
        prompts = None
        if index in config.visual_prompt_layers(num_layers):
            prompts = torch.randn(config.num_visual_tokens, hidden) * config.prompt_init_std
        class_aware = None
        if index in config.class_aware_layers(num_layers):
            class_aware = ClassAwarePromptGenerator(
                feature_dim=config.projection_dim,
                hidden_size=hidden,
                num_classes=self.num_classes(adapter_name),
                num_kv_tokens=config.class_aware_num_kv_tokens,
                attention_dim=config.class_aware_attention_dim,
                init_std=config.prompt_init_std,
            )
        module.update_layer(adapter_name, prompts, class_aware)
        return module

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Checkpoint keys hold no adapter name, also inside nested modules such as CAVPT's
        (`...dpt_class_aware.<name>.classifier.weight` -> `...dpt_class_aware.classifier.weight`)."""
        return re.sub(rf"\.({cls.prefix}\w+)\.{re.escape(adapter_name)}(?=\.|$)", r".\1", key)

    # ------------------------------------------------------------------ adapters and their parameters
    def _forget(self, adapter_name: str) -> None:
        self.label_spaces.forget(adapter_name)
        self.class_features.clear(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.check_adapter_names(adapter_name, "does not exist")
        super().delete_adapter(adapter_name)
        self._forget(adapter_name)

    def check_adapter_names(self, adapter_name: str | list[str], peft_wording: str = "not found") -> None:
        """An unknown adapter refused in PEFT's words (`Adapter x does not exist` to delete, `not found` to set)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise UserInputError(f"Adapter {unknown[0]} {peft_wording}; the adapters are {sorted(self.peft_config)}.")

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        self.check_adapter_names(adapter_name)
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def unload(self) -> nn.Module:
        """Put the original modules back and return the untouched base model (e.g. the `CLIPModel`)."""
        for name, module in list(self.model.named_modules()):
            if isinstance(module, DPTLayer):
                parent_name, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent_name), child, module.base_layer)
        self.class_features.clear()
        vars(self.model).pop("peft_config", None)  # as PEFT's unload: wrapping it again must find no adapter config
        return self.model

    def merge_and_unload(self, *args, **kwargs) -> nn.Module:
        raise NotImplementedError(MERGE_REFUSAL)

    merge_adapter = unmerge_adapter = merge_and_unload

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Prompts are made in float32 and cast where they are used (PEFT's autocast). With
        `autocast_adapter_dtype=False` an adapter is kept in the base model's dtype, as PEFT does for its own."""
        if autocast_adapter_dtype:
            return
        dtype = self.backbone.text_parameter.dtype
        for _, parameter in self.adapter_parameters(adapter_name).values():
            parameter.data = parameter.data.to(dtype)

    @property
    def _active(self) -> str:
        if len(self.active_adapters) != 1:
            raise UserInputError(
                f"DPT applies one adapter at a time, but {self.active_adapters} are active; choose one with "
                "model.set_adapter(name)."
            )
        return self.active_adapters[0]

    def _layers(self) -> Iterator[tuple[str, DPTLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, DPTLayer):
                yield name, module

    def adapter_parameters(self, adapter_name: str | None = None) -> dict[str, tuple[ParameterKind, nn.Parameter]]:
        """Every prompt parameter of an adapter: key as saved (without adapter name) -> (kind, parameter).

        The kind comes from the layer attribute the parameter lives in; optimizer groups and transfer ask here.
        """
        adapter_name = adapter_name or self._active
        return {
            f"{layer_name}.{name}": (kind, parameter)
            for layer_name, layer in self._layers()
            for name, kind, parameter in layer.adapter_parameters(adapter_name)
        }

    def visual_prompts(self, adapter_name: str | None = None) -> dict[int, nn.Parameter]:
        """Deep visual prompts `[n_vis, D]` of an adapter, by vision layer index."""
        adapter_name = adapter_name or self._active
        return {
            layer.layer_index: layer.dpt_visual_prompts[adapter_name]
            for _, layer in self._layers()
            if isinstance(layer, VisionPromptLayer) and adapter_name in layer.dpt_visual_prompts
        }

    def class_aware_layers(self, adapter_name: str | None = None) -> list[int]:
        """Indices of the vision layers with class-aware prompts of an adapter."""
        adapter_name = adapter_name or self._active
        return sorted(
            layer.layer_index
            for _, layer in self._layers()
            if isinstance(layer, VisionPromptLayer) and adapter_name in layer.dpt_class_aware
        )

    def text_context(self, adapter_name: str | None = None) -> nn.Parameter | None:
        """The learned context of an adapter (`[n_ctx, E]` or `[C, n_ctx, E]`), or None when it learns none."""
        return self.class_features.text_context(adapter_name or self._active)

    def token_embedding(self) -> nn.Embedding:
        """The text encoder's vocabulary embedding (wrapped or not, `token_embedding` is the same module)."""
        return self.backbone.token_embedding

    def tokenizer(self, adapter_name: str | None = None) -> PreTrainedTokenizerBase:
        """The tokenizer an adapter's class prompts were built with."""
        return self.label_spaces.tokenizer(adapter_name or self._active)

    # ------------------------------------------------------------------ label space
    def set_class_names(
        self,
        class_names: list[str] | dict[str, list[str]],
        adapter_name: str | None = None,
        zero_shot_template: str | None = None,
    ) -> None:
        """Switch the label space (new classes, base-to-new evaluation) without touching the learned prompts.

        `zero_shot_template` also switches the frozen template (another dataset's, as DPT evaluates cross-dataset
        targets): it drives the zero-shot logits and the CAVPT top-K selection. The auxiliary class-aware classifier
        belongs to the training label space: it is rebuilt (freshly initialized) when the number of classes
        changes. Class-specific contexts cannot change their class count.
        """
        adapter_name = adapter_name or self._active
        config: DPTConfig = self.peft_config[adapter_name]
        template = zero_shot_template or config.zero_shot_template
        new_config = dataclasses.replace(config, class_names=class_names, zero_shot_template=template)
        classes = self.label_spaces.tokenize_for(adapter_name, new_config, self.text_context_length)
        old_total = self.num_classes(adapter_name)
        new_total = sum(t.num_classes for t in classes.values())
        if config.class_specific_context and new_total != old_total:
            raise UserInputError(
                f"class_specific_context=True learned one context per class for {old_total} classes; it cannot "
                f"serve {new_total}. Keep the class count or use an adapter with a shared context."
            )
        config.class_names = class_names
        config.zero_shot_template = template
        self.label_spaces.replace(adapter_name, classes)
        if new_total != old_total:
            for _, layer in self._layers():
                if isinstance(layer, VisionPromptLayer) and adapter_name in layer.dpt_class_aware:
                    layer.dpt_class_aware[adapter_name].reset_classifier(new_total)
        self.class_features.clear(adapter_name)

    def class_names(self, task: str | None = None, adapter_name: str | None = None) -> list[str]:
        return list(self.task_classes(adapter_name or self._active, task).names)

    def num_classes(self, adapter_name: str | None = None) -> int:
        """Classes of the adapter's whole label space (all tasks)."""
        return self.label_spaces.num_classes(adapter_name or self._active)

    def task_classes(self, adapter_name: str, task: str | None = None) -> TaskClasses:
        """One task's tokenized label space (`task` may be None for a single-task adapter)."""
        return self.label_spaces.task_classes(adapter_name, task)

    def label_space_for(self, class_names: list[str], adapter_name: str | None = None) -> TaskClasses:
        """A tokenized label space of other classes for one call (`classify(class_names=...)`): the adapter's own
        classes, config and auxiliary classifier stay as they are."""
        adapter_name = adapter_name or self._active
        config = self.peft_config[adapter_name]
        return self.label_spaces.for_call(adapter_name, config, class_names, self.text_context_length)

    # ------------------------------------------------------------------ the per-forward seam
    def forward_context(self, **inputs: Any) -> AbstractContextManager[ForwardContext]:
        """Hand the wrapped layers what they need for one forward and collect what they produce.

        `inputs` are `ForwardContext` fields (e.g. `bypass=True` for the frozen CLIP, or `capture_layers={3}` and
        `on_layer_input` to receive the tokens entering vision layer 3). The previous context is restored on exit,
        even after an error, so nothing of one forward leaks into the next.
        """
        return self._slot.install(**inputs)

    # ------------------------------------------------------------------ class and image features
    def class_text_features(self, task: str | None = None, adapter_name: str | None = None) -> torch.Tensor:
        """Text features of the class prompts with the learned context `[C, P]` (un-normalized)."""
        adapter_name = adapter_name or self._active
        classes = self.task_classes(adapter_name, task)
        return self.class_features.learned(adapter_name, self.peft_config[adapter_name], classes)

    def zero_shot_text_features(self, task: str | None = None, adapter_name: str | None = None) -> torch.Tensor:
        """Frozen text features of `zero_shot_template` for each class `[C, P]` (cached per class set)."""
        adapter_name = adapter_name or self._active
        classes = self.task_classes(adapter_name, task)
        return self.class_features.zero_shot(adapter_name, self.peft_config[adapter_name], classes)

    def zero_shot_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image features `[B, P]` of the frozen, prompt-free model."""
        with torch.no_grad(), self.forward_context(bypass=True):
            return self.backbone.image_features(pixel_values)

    def frozen_layer_inputs(
        self, pixel_values: torch.Tensor, layers: list[int], consume: Callable[[int, torch.Tensor], None]
    ) -> None:
        """Hand `consume(layer, tokens [B, N, D])` the tokens entering each of `layers` in the frozen, prompt-free
        CLIP (SPT's token pools), layer by layer, so no layer's tokens outlive their use."""
        with (
            torch.no_grad(),
            self.forward_context(bypass=True, capture_layers=frozenset(layers), on_layer_input=consume),
        ):
            self.backbone.image_features(pixel_values)

    # ------------------------------------------------------------------ classification
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
        output_text_embeds: bool = False,
    ) -> DPTOutput:
        """Classify images over the active adapter's classes (docs/method.md, sections 1-4, 10).

        `guidance=True` uses the general-knowledge-guidance loss of the reference's first epochs. `labels` index
        the task's class list. `attention_classes` (`[M]` class indices) reports in `class_aware_attentions` the
        attention that prompts built from those classes would have, instead of the top-K prompts' attention.
        `class_names` classifies over other classes for this call only (inference; `set_class_names` switches the
        adapter's label space for good). `zero_shot_image_features` are the frozen CLIP's features of these images
        when the caller has them already (an evaluation set seen before): exact, and one image pass cheaper.
        `output_text_embeds=True` adds the class features `[C, P]`, the one output without a batch dimension.
        `consistency_weights` add PromptSRC's terms to the loss (`loss_terms` has each part); `zero_shot_ensemble`, in
        eval mode only, makes `logits` the log of the adapter's and the zero-shot classifier's mixed probabilities.
        """
        adapter_name = self._active
        config: DPTConfig = self.peft_config[adapter_name]
        if class_names is not None and labels is not None:
            raise UserInputError(
                "class_names classifies over other classes for one call, at inference; to train on other classes, "
                "switch the label space with set_class_names first."
            )
        if class_names is not None:
            classes = self.label_space_for(class_names, adapter_name)
        else:
            classes = self.task_classes(adapter_name, task)
        check_pixel_values(pixel_values)
        labels = checked_labels(labels, len(pixel_values), classes.num_classes) if labels is not None else None
        text = self.class_features.learned(adapter_name, config, classes)
        regularized = labels is not None and consistency_on(config.consistency_weights)
        ensembled = config.zero_shot_ensemble is not None and not self.training
        zero_shot_logits = zero_shot_image = zero_shot_text = top_k = None
        if needs_zero_shot := config.class_aware or guidance or output_zero_shot_logits or regularized or ensembled:
            zero_shot_text = self.class_features.zero_shot(adapter_name, config, classes)
            if zero_shot_image_features is not None:
                zero_shot_image = zero_shot_image_features.to(pixel_values.device)
            elif config.class_aware or config.has_visual_prompts:  # else the prompted pass below is the frozen one
                zero_shot_image = self.zero_shot_image_features(pixel_values)
            if zero_shot_image is not None:
                zero_shot_logits = self.backbone.logits(zero_shot_image, zero_shot_text)
        inputs: dict[str, Any] = {"record_attention": output_attentions}
        if config.class_aware:
            top_k = zero_shot_logits.topk(min(config.class_aware_top_k, classes.num_classes), dim=-1).indices
            inputs["class_features"] = text[top_k]
            if attention_classes is not None:
                probes = text[torch.as_tensor(attention_classes, device=text.device)]
                inputs["probe_class_features"] = probes.unsqueeze(0).expand(len(pixel_values), -1, -1)
        with self.forward_context(**inputs) as context:
            image = self.backbone.image_features(pixel_values)
        if needs_zero_shot and zero_shot_image is None:  # no visual prompts (CoOp): the same pass, exactly
            zero_shot_image = image.detach()
            zero_shot_logits = self.backbone.logits(zero_shot_image, zero_shot_text)
        span = slice(classes.offset, classes.offset + classes.num_classes)
        own_classes = class_names is None  # the auxiliary classifier belongs to the training label space only
        class_aware_logits = tuple(logits[..., span] for logits in context.class_aware_logits) if own_classes else ()
        attentions = context.probe_attentions if attention_classes is not None else context.class_aware_attentions
        logits = self.backbone.logits(image, text)

        loss = class_aware_loss = loss_terms = None
        if labels is not None:
            targets = self.class_features.consistency_targets(adapter_name, config, classes, self.label_spaces)
            frozen = (zero_shot_image, zero_shot_text, zero_shot_logits)
            tensors = ForwardTensors(image, text, logits, *frozen, class_aware_logits, top_k, targets)
            loss, class_aware_loss, loss_terms = training_loss(self.backbone, config, tensors, labels, guidance)
        if ensembled:  # at inference only: the loss above is the adapter's own
            logits = ensemble_logits(logits, zero_shot_logits, config.zero_shot_ensemble)
        return DPTOutput(
            loss=loss,
            logits=logits,
            zero_shot_logits=zero_shot_logits,
            class_aware_logits=class_aware_logits or None,
            class_aware_indices=top_k,
            class_aware_loss=class_aware_loss,
            class_aware_attentions=tuple(attentions[i] for i in sorted(attentions)) or None,
            image_embeds=image,
            text_embeds=text if output_text_embeds else None,
            loss_terms=loss_terms,
        )
