"""`DPTModel`: the PEFT tuner that wires DPT's prompts into a `transformers.CLIPModel`."""

from __future__ import annotations

import dataclasses
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from transformers import AutoTokenizer, CLIPModel, PreTrainedTokenizerBase

from .class_prompts import PromptLayout, build_prompt_layout, build_template_ids, context_init_ids
from .config import DPTConfig
from .layer import ClassAwarePromptGenerator, DPTLayer, ForwardState, TextContextEmbeddings, VisionPromptLayer
from .outputs import DPTOutput
from .transfer import copy_shared_tensors, shared_source_tensors

TEXT_EMBEDDINGS_KEY = "text_model.embeddings"
VISION_LAYER_KEY = "vision_model.encoder.layers.{}"
GUIDANCE_JOINT_WEIGHT = 0.1  # weight of the joint DPT loss during general-knowledge guidance (reference value)
BASE_SHAPE_FIELDS = ("vision_hidden_size", "vision_num_layers", "text_hidden_size", "projection_dim")


@dataclass(frozen=True)
class TaskClasses:
    """One task's label space, tokenized: everything the class side of a forward needs."""

    names: tuple[str, ...]
    offset: int  # index of the first class inside the adapter's union label space
    prompt_layout: Optional[PromptLayout]  # None when the text context is not learned
    template_ids: torch.Tensor  # [C, T] hand-crafted prompts of the zero-shot classifier

    @property
    def num_classes(self) -> int:
        return len(self.names)


def _normalize(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=-1, keepdim=True)


class DPTModel(BaseTuner):
    """Dual-modality Prompt Tuning of a frozen CLIP (https://arxiv.org/abs/2208.08340).

    Wraps `text_model.embeddings` (learned context) and the vision encoder layers that carry prompts
    (deep and class-aware). Use it through `get_peft_model(clip, DPTConfig(...))`, whose forward
    (`DPTPeftModel.forward`) calls [`DPTModel.classify`].

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
    target_module_mapping: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ injection
    def _pre_injection_hook(self, model: nn.Module, config: DPTConfig, adapter_name: str) -> None:
        if not isinstance(model, CLIPModel):
            raise TypeError(
                f"DPT adapts a transformers.CLIPModel, got {type(model).__name__}; load the base model with "
                "CLIPModel.from_pretrained(...)."
            )
        self._state = ForwardState()
        self._classes: dict[str, dict[str, TaskClasses]] = {}
        self._tokenizers: dict[str, PreTrainedTokenizerBase] = {}
        self._feature_cache: dict[tuple, tuple[tuple, torch.Tensor]] = {}

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        """Validate everything against the base model first, so a bad config leaves the CLIP untouched."""
        config: DPTConfig = self.peft_config[adapter_name]
        base_shape = self._check_base_shape(config, model)
        num_layers = model.config.vision_config.num_hidden_layers
        config.validate_for_model(num_layers, self._text_context_length(model))
        tokenizer = self._load_tokenizer(config)
        classes = self._build_classes(config, tokenizer, model)
        sources = shared_source_tensors(config.init_from) if config.init_from else None
        for key, value in base_shape.items():  # recorded once every check has passed
            setattr(config, key, value)
        self._classes[adapter_name] = classes
        self._tokenizers[adapter_name] = tokenizer
        try:
            super().inject_adapter(model, adapter_name, **kwargs)
        except Exception:
            self._forget(adapter_name)
            raise
        if sources is not None:
            try:
                copy_shared_tensors(self, adapter_name, sources)
            except ValueError:
                self._roll_back_injection(adapter_name)
                raise

    def _roll_back_injection(self, adapter_name: str) -> None:
        """Remove an adapter that was injected but could not be initialized; the first one leaves no wrapper."""
        if len(self.peft_config) == 1:
            self.unload()
        else:
            BaseTuner.delete_adapter(self, adapter_name)
        self._forget(adapter_name)

    def _check_base_shape(self, config: DPTConfig, model: CLIPModel) -> dict[str, int]:
        """The base model's widths and depth; an error if the config was recorded for other ones."""
        actual = {
            "vision_hidden_size": model.config.vision_config.hidden_size,
            "vision_num_layers": model.config.vision_config.num_hidden_layers,
            "text_hidden_size": model.config.text_config.hidden_size,
            "projection_dim": model.config.projection_dim,
        }
        mismatched = {k: (getattr(config, k), v) for k, v in actual.items() if getattr(config, k) not in (None, v)}
        if mismatched:
            details = ", ".join(f"{k}: adapter {a}, model {m}" for k, (a, m) in mismatched.items())
            raise ValueError(
                f"This adapter was made for a CLIP of another shape ({details}); load it into the base model it "
                f"was trained on ({config.base_model_name_or_path or 'see adapter_config.json'}). A DPTConfig "
                "records the shape of the first CLIP it is applied to: for another CLIP, create a new DPTConfig."
            )
        return actual

    @staticmethod
    def _text_context_length(model: CLIPModel) -> int:
        return model.config.text_config.max_position_embeddings

    def _load_tokenizer(self, config: DPTConfig) -> PreTrainedTokenizerBase:
        source = config.tokenizer_name_or_path or config.base_model_name_or_path or self.model.name_or_path
        if not source:
            raise ValueError(
                "No CLIP tokenizer found: the base model has no name_or_path (built from a config?). Set "
                "tokenizer_name_or_path in DPTConfig to a directory or Hub id with the CLIP tokenizer."
            )
        for tokenizer in self._tokenizers.values():
            if tokenizer.name_or_path == source:
                return tokenizer
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"Could not load a CLIP tokenizer from {source!r} ({err}). Set tokenizer_name_or_path in DPTConfig "
                "to a directory or Hub id that holds the base model's tokenizer."
            ) from err

    def _build_classes(
        self, config: DPTConfig, tokenizer: PreTrainedTokenizerBase, model: CLIPModel
    ) -> dict[str, TaskClasses]:
        max_length = self._text_context_length(model)
        pad_to = max_length if config.pad_text_to_context else None
        num_context = self._num_context(config, tokenizer)
        classes, offset = {}, 0
        for task, names in config.tasks.items():
            layout = None
            if config.learn_text_context:
                layout = build_prompt_layout(
                    tokenizer, names, num_context, config.class_token_position, max_length,
                    class_offset=offset, class_specific=config.class_specific_context, pad_to=pad_to,
                )
            template_ids = build_template_ids(tokenizer, names, config.zero_shot_template, max_length, pad_to=pad_to)
            classes[task] = TaskClasses(tuple(names), offset, layout, template_ids)
            offset += len(names)
        return classes

    @staticmethod
    def _num_context(config: DPTConfig, tokenizer: PreTrainedTokenizerBase) -> int:
        if config.text_init is not None:
            return len(context_init_ids(tokenizer, config.text_init))
        return config.num_text_tokens

    def _prepare_adapter_config(self, config: DPTConfig, model_config: dict) -> DPTConfig:
        return config  # targets come from the prompt settings (see `_target_keys`), not from `target_modules`

    def _check_target_module_exists(self, config: DPTConfig, key: str) -> bool:
        return key in self._target_keys(config)

    def _target_keys(self, config: DPTConfig) -> set[str]:
        num_layers = self.model.config.vision_config.num_hidden_layers
        layers = set(config.visual_prompt_layers(num_layers)) | set(config.class_aware_layers(num_layers))
        keys = {VISION_LAYER_KEY.format(i) for i in layers}
        if config.learn_text_context:
            keys.add(TEXT_EMBEDDINGS_KEY)
        return keys

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
        if current_key == TEXT_EMBEDDINGS_KEY:
            module = target if isinstance(target, TextContextEmbeddings) else TextContextEmbeddings(target, self._state)
            module.update_layer(adapter_name, self._initial_context(config, adapter_name, module.base_layer))
        else:
            index = int(current_key.rsplit(".", 1)[1])
            module = target if isinstance(target, VisionPromptLayer) else VisionPromptLayer(target, self._state, index)
            module.update_layer(adapter_name, *self._initial_visual_prompts(config, adapter_name, index))
        if module is not target:
            self._replace(parent, target_name, module, target)

    @staticmethod
    def _replace(parent: nn.Module, name: str, new: nn.Module, old: nn.Module) -> None:
        setattr(parent, name, new)
        weight = next(old.parameters())
        new.to(device=weight.device)

    def _initial_context(self, config: DPTConfig, adapter_name: str, embeddings: nn.Module) -> torch.Tensor:
        token_embedding = embeddings.token_embedding
        width = token_embedding.weight.shape[1]
        num_rows = sum(t.num_classes for t in self._classes[adapter_name].values()) if config.class_specific_context else 1
        if config.text_init is not None:
            ids = torch.tensor(context_init_ids(self._tokenizers[adapter_name], config.text_init))
            with torch.no_grad():
                context = token_embedding(ids.to(token_embedding.weight.device)).float()
            context = context.unsqueeze(0).expand(num_rows, -1, -1)
        else:
            context = torch.randn(num_rows, config.num_text_tokens, width) * config.prompt_init_std
        return context if config.class_specific_context else context[0]

    def _initial_visual_prompts(
        self, config: DPTConfig, adapter_name: str, index: int
    ) -> tuple[Optional[torch.Tensor], Optional[ClassAwarePromptGenerator]]:
        num_layers = config.vision_num_layers
        hidden = config.vision_hidden_size
        prompts = None
        if index in config.visual_prompt_layers(num_layers):
            prompts = torch.randn(config.num_visual_tokens, hidden) * config.prompt_init_std
        class_aware = None
        if index in config.class_aware_layers(num_layers):
            class_aware = ClassAwarePromptGenerator(
                feature_dim=config.projection_dim,
                hidden_size=hidden,
                num_classes=sum(t.num_classes for t in self._classes[adapter_name].values()),
                num_kv_tokens=config.class_aware_num_kv_tokens,
                attention_dim=config.class_aware_attention_dim,
                init_std=config.prompt_init_std,
            )
        return prompts, class_aware

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Checkpoint keys hold no adapter name, also inside nested modules such as CAVPT's
        (`...dpt_class_aware.<name>.classifier.weight` -> `...dpt_class_aware.classifier.weight`)."""
        return re.sub(rf"\.({cls.prefix}\w+)\.{re.escape(adapter_name)}(?=\.|$)", r".\1", key)

    # ------------------------------------------------------------------ adapter management
    def _forget(self, adapter_name: str) -> None:
        self._classes.pop(adapter_name, None)
        self._tokenizers.pop(adapter_name, None)
        self._clear_cache(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.check_adapter_names(adapter_name)
        super().delete_adapter(adapter_name)
        self._forget(adapter_name)

    def check_adapter_names(self, adapter_name: Union[str, list[str]]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter {unknown[0]!r}; the adapters are {sorted(self.peft_config)}.")

    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        self.check_adapter_names(adapter_name)
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def unload(self) -> CLIPModel:
        """Put the original CLIP modules back and return the untouched `CLIPModel`."""
        for name, module in list(self.model.named_modules()):
            if isinstance(module, DPTLayer):
                parent_name, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent_name), child, module.base_layer)
        self._feature_cache.clear()
        return self.model

    def merge_and_unload(self, *args, **kwargs) -> CLIPModel:
        raise NotImplementedError("Prompts cannot be merged into CLIP's weights; use unload() for the base model.")

    @property
    def _active(self) -> str:
        if len(self.active_adapters) != 1:
            raise ValueError(
                f"DPT applies one adapter at a time, but {self.active_adapters} are active; choose one with "
                "model.set_adapter(name)."
            )
        return self.active_adapters[0]

    def set_class_names(self, class_names: Union[list[str], dict[str, list[str]]], adapter_name: Optional[str] = None) -> None:
        """Switch the label space (new classes, base-to-new evaluation) without touching the learned prompts.

        The auxiliary class-aware classifier belongs to the training label space: it is rebuilt (freshly
        initialized) when the number of classes changes. Class-specific contexts cannot change their class count.
        """
        adapter_name = adapter_name or self._active
        config: DPTConfig = self.peft_config[adapter_name]
        new_config = dataclasses.replace(config, class_names=class_names)
        classes = self._build_classes(new_config, self._tokenizers[adapter_name], self.model)
        old_total = sum(t.num_classes for t in self._classes[adapter_name].values())
        new_total = sum(t.num_classes for t in classes.values())
        if config.class_specific_context and new_total != old_total:
            raise ValueError(
                f"class_specific_context=True learned one context per class for {old_total} classes; it cannot "
                f"serve {new_total}. Keep the class count or use an adapter with a shared context."
            )
        config.class_names = class_names
        self._classes[adapter_name] = classes
        if new_total != old_total:
            for module in self.model.modules():
                if isinstance(module, VisionPromptLayer) and adapter_name in module.dpt_class_aware:
                    module.dpt_class_aware[adapter_name].reset_classifier(new_total)
        self._clear_cache(adapter_name)

    def class_names(self, task: Optional[str] = None, adapter_name: Optional[str] = None) -> list[str]:
        return list(self._task(adapter_name or self._active, task).names)

    def _task(self, adapter_name: str, task: Optional[str]) -> TaskClasses:
        tasks = self._classes[adapter_name]
        if task is None:
            if len(tasks) > 1:
                raise ValueError(f"This adapter has several tasks; pass task= one of {sorted(tasks)}.")
            return next(iter(tasks.values()))
        if task not in tasks:
            raise ValueError(f"Unknown task {task!r}; the tasks of adapter {adapter_name!r} are {sorted(tasks)}.")
        return tasks[task]

    # ------------------------------------------------------------------ class-side features
    def _clear_cache(self, adapter_name: Optional[str] = None) -> None:
        for key in [k for k in self._feature_cache if adapter_name is None or k[0] == adapter_name]:
            del self._feature_cache[key]

    def _cached(self, key: tuple, stamp: tuple, compute) -> torch.Tensor:
        """Reuse class features while `stamp` (device, dtype, parameter versions) is unchanged and no grad is needed."""
        if torch.is_grad_enabled() or not self.peft_config[key[0]].cache_class_features:
            return compute()
        hit = self._feature_cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        features = compute()
        self._feature_cache[key] = (stamp, features)
        return features

    def _text_stamp(self) -> tuple:
        weight = self.model.text_projection.weight
        return (weight.device, weight.dtype, torch.is_autocast_enabled(weight.device.type))

    def _encode_text(self, input_ids: torch.Tensor, layout: Optional[PromptLayout] = None) -> torch.Tensor:
        device = self.model.text_projection.weight.device
        self._state.prompt_layout = None if layout is None else layout.to(device)
        try:
            return self.model.get_text_features(input_ids=input_ids.to(device)).pooler_output
        finally:
            self._state.prompt_layout = None

    def zero_shot_text_features(self, task: Optional[str] = None, adapter_name: Optional[str] = None) -> torch.Tensor:
        """Frozen text features of `zero_shot_template` for each class `[C, P]` (cached per class set)."""
        adapter_name = adapter_name or self._active
        classes = self._task(adapter_name, task)

        def compute() -> torch.Tensor:
            with torch.no_grad(), self.frozen():
                return self._encode_text(classes.template_ids)

        key = (adapter_name, classes.names, "zero_shot")
        with torch.no_grad():
            return self._cached(key, self._text_stamp(), compute)

    def class_text_features(self, task: Optional[str] = None, adapter_name: Optional[str] = None) -> torch.Tensor:
        """Text features of the class prompts with the learned context `[C, P]` (un-normalized)."""
        adapter_name = adapter_name or self._active
        classes = self._task(adapter_name, task)
        if classes.prompt_layout is None:
            return self.zero_shot_text_features(task, adapter_name)
        context = self.model.text_model.embeddings.dpt_context[adapter_name]
        key = (adapter_name, classes.names, "learned")
        stamp = (*self._text_stamp(), context._version, context.data_ptr())
        return self._cached(key, stamp, lambda: self._encode_text(classes.prompt_layout.input_ids, classes.prompt_layout))

    # ------------------------------------------------------------------ image side and classification
    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Run the base CLIP without any prompt (zero-shot pass, prototype collection)."""
        previous, self._state.bypass = self._state.bypass, True
        try:
            yield
        finally:
            self._state.bypass = previous

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def zero_shot_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.frozen():
            return self.image_features(pixel_values)

    def _scaled_cosine(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        return self.model.logit_scale.exp() * _normalize(images) @ _normalize(texts).t().to(images.dtype)

    def classify(
        self,
        pixel_values: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        task: Optional[str] = None,
        guidance: bool = False,
        output_zero_shot_logits: bool = False,
        output_attentions: bool = False,
    ) -> DPTOutput:
        """Classify images over the active adapter's classes (METHOD.md sections 1-4).

        `guidance=True` uses the general-knowledge-guidance loss of the reference's first epochs: text prompts
        learn against frozen image features, visual prompts against the frozen zero-shot classifier, plus
        0.1 x the joint loss. `labels` index the task's class list.
        """
        adapter_name = self._active
        config: DPTConfig = self.peft_config[adapter_name]
        classes = self._task(adapter_name, task)
        text = self.class_text_features(task, adapter_name)
        need_zero_shot = config.class_aware or guidance or output_zero_shot_logits
        zero_shot_logits = zero_shot_image = zero_shot_text = top_k = None
        if need_zero_shot:
            zero_shot_text = self.zero_shot_text_features(task, adapter_name)
            zero_shot_image = self.zero_shot_image_features(pixel_values)
            zero_shot_logits = self._scaled_cosine(zero_shot_image, zero_shot_text)
        if config.class_aware:
            k = min(config.class_aware_top_k, classes.num_classes)
            top_k = zero_shot_logits.topk(k, dim=-1).indices
            self._state.class_features = text[top_k]
        self._state.reset_outputs()
        self._state.record_attention = output_attentions
        try:
            image = self.image_features(pixel_values)
        finally:
            self._state.class_features = None
            self._state.record_attention = False
        span = slice(classes.offset, classes.offset + classes.num_classes)
        class_aware_logits = tuple(logits[..., span] for logits in self._state.class_aware_logits)
        attentions = tuple(self._state.class_aware_attention) or None
        self._state.reset_outputs()
        logits = self._scaled_cosine(image, text)

        loss = class_aware_loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if guidance:
                loss = (
                    F.cross_entropy(self._scaled_cosine(zero_shot_image, text), labels)
                    + F.cross_entropy(self._scaled_cosine(image, zero_shot_text), labels)
                    + GUIDANCE_JOINT_WEIGHT * F.cross_entropy(logits, labels)
                )
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
            class_aware_attentions=attentions,
            image_embeds=image,
            text_embeds=text,
        )


def class_aware_cross_entropy(
    layer_logits: tuple[torch.Tensor, ...], top_k: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Auxiliary CAVPT loss: cross-entropy of every (layer, prompt) whose selected class is the image's label.

    Images whose label is not among their top-K classes add nothing; with no such prompt at all the loss
    is 0 (and still part of the graph).
    """
    logits = torch.stack(layer_logits, dim=1)  # [B, layers, K, C]
    matches = (top_k == labels.unsqueeze(1)).unsqueeze(1).expand(-1, logits.shape[1], -1)  # [B, layers, K]
    if not matches.any():
        return logits.sum() * 0.0
    targets = labels.view(-1, 1, 1).expand_as(matches)
    return F.cross_entropy(logits[matches].float(), targets[matches])
