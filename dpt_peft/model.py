"""`DPTModel`: the PEFT tuner that wires DPT's prompts into a `transformers.CLIPModel` and classifies with them."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from transformers import AutoTokenizer, CLIPModel, PreTrainedTokenizerBase

from .class_prompts import PromptLayout, TaskClasses, build_label_space, context_init_ids
from .config import DPTConfig
from .feature_cache import ClassFeatureCache
from .inputs import check_pixel_values, checked_labels
from .layer import (
    ClassAwarePromptGenerator,
    DPTLayer,
    ForwardContext,
    ForwardContextSlot,
    ParameterKind,
    TextContextEmbeddings,
    VisionPromptLayer,
)
from .losses import class_aware_cross_entropy, guidance_loss
from .outputs import DPTOutput
from .shared_prefix import encode_with_shared_prefix, shared_prefix_length, usable_prefix_length
from .toy.pretrain import resolve_model_path
from .transfer import copy_shared_tensors, shared_source_tensors

TEXT_EMBEDDINGS_KEY = "text_model.embeddings"
VISION_LAYER_KEY = "vision_model.encoder.layers.{}"


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
    # The label space, tokenizer, forward context and class features live on this tuner, and only
    # DPTPeftModel.forward classifies with them: peft's inject_adapter_in_model (and transformers' load_adapter,
    # which calls it) refuse such tuners, instead of returning a CLIP whose prompts are silently half applied.
    uses_shared_state: bool = True
    target_module_mapping: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ injection
    def _pre_injection_hook(self, model: nn.Module, config: DPTConfig, adapter_name: str) -> None:
        if not isinstance(model, CLIPModel):
            raise TypeError(
                f"DPT adapts a transformers.CLIPModel, got {type(model).__name__}; load the base model with "
                "CLIPModel.from_pretrained(...)."
            )
        self._slot = ForwardContextSlot()
        self._classes: dict[str, dict[str, TaskClasses]] = {}
        self._tokenizers: dict[str, PreTrainedTokenizerBase] = {}
        self._other_label_spaces: dict[str, TaskClasses] = {}
        self.feature_cache = ClassFeatureCache()

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        """Validate everything against the base model first, so a bad config leaves the CLIP untouched."""
        config: DPTConfig = self.peft_config[adapter_name]
        base_shape = self._check_base_shape(config, model)
        config.validate_for_model(base_shape["vision_num_layers"], self.text_context_length)
        tokenizer = self._load_tokenizer(config)
        classes = build_label_space(config, tokenizer, self.text_context_length)
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

    @staticmethod
    def _check_base_shape(config: DPTConfig, model: CLIPModel) -> dict[str, int]:
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

    @property
    def text_context_length(self) -> int:
        """Positions of the text encoder: the longest prompt it can encode."""
        return self.model.config.text_config.max_position_embeddings

    def _load_tokenizer(self, config: DPTConfig) -> PreTrainedTokenizerBase:
        # The CLIP passed in comes first: the path recorded at training time may not exist on this machine.
        source = config.tokenizer_name_or_path or self.model.name_or_path or config.base_model_name_or_path
        if not source:
            raise ValueError(
                "No CLIP tokenizer found: the base model has no name_or_path (built from a config?). Set "
                "tokenizer_name_or_path in DPTConfig to a directory or Hub id with the CLIP tokenizer."
            )
        for tokenizer in self._tokenizers.values():
            if tokenizer.name_or_path == source:
                return tokenizer
        try:
            return AutoTokenizer.from_pretrained(resolve_model_path(source))
        except (OSError, ValueError) as err:
            raise ValueError(
                f"Could not load a CLIP tokenizer from {source!r} ({err}). Set tokenizer_name_or_path in DPTConfig "
                "to a directory or Hub id that holds the base model's tokenizer."
            ) from err

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
            module = self._wire_text_context(config, adapter_name, target)
        else:
            module = self._wire_vision_layer(config, adapter_name, target, int(current_key.rsplit(".", 1)[1]))
        if module is not target:
            setattr(parent, target_name, module)
        module.move_to_base_layer_device(adapter_name)  # skips meta tensors (low_cpu_mem_usage)

    def _wire_text_context(self, config: DPTConfig, adapter_name: str, target: nn.Module) -> TextContextEmbeddings:
        """The learned context (docs/method.md, section 1): the phrase's embeddings, or random normal."""
        module = target if isinstance(target, TextContextEmbeddings) else TextContextEmbeddings(target, self._slot)
        token_embedding = module.token_embedding
        classes = self._classes[adapter_name].values()
        num_rows = sum(t.num_classes for t in classes) if config.class_specific_context else 1
        if config.text_init is not None:
            ids = torch.tensor(context_init_ids(self._tokenizers[adapter_name], config.text_init))
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
        self._classes.pop(adapter_name, None)
        self._other_label_spaces.pop(adapter_name, None)
        self._tokenizers.pop(adapter_name, None)
        self.feature_cache.clear(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.check_adapter_names(adapter_name)
        super().delete_adapter(adapter_name)
        self._forget(adapter_name)

    def check_adapter_names(self, adapter_name: str | list[str]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter {unknown[0]!r}; the adapters are {sorted(self.peft_config)}.")

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        self.check_adapter_names(adapter_name)
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def unload(self) -> CLIPModel:
        """Put the original CLIP modules back and return the untouched `CLIPModel`."""
        for name, module in list(self.model.named_modules()):
            if isinstance(module, DPTLayer):
                parent_name, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent_name), child, module.base_layer)
        self.feature_cache.clear()
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
        adapter_name = adapter_name or self._active
        embeddings = self.model.text_model.embeddings
        if isinstance(embeddings, TextContextEmbeddings) and adapter_name in embeddings.dpt_context:
            return embeddings.dpt_context[adapter_name]
        return None

    def token_embedding(self) -> nn.Embedding:
        """The text encoder's vocabulary embedding (wrapped or not, `token_embedding` is the same module)."""
        return self.model.text_model.embeddings.token_embedding

    def tokenizer(self, adapter_name: str | None = None) -> PreTrainedTokenizerBase:
        """The tokenizer an adapter's class prompts were built with."""
        return self._tokenizers[adapter_name or self._active]

    # ------------------------------------------------------------------ label space
    def set_class_names(self, class_names: list[str] | dict[str, list[str]], adapter_name: str | None = None) -> None:
        """Switch the label space (new classes, base-to-new evaluation) without touching the learned prompts.

        The auxiliary class-aware classifier belongs to the training label space: it is rebuilt (freshly
        initialized) when the number of classes changes. Class-specific contexts cannot change their class count.
        """
        adapter_name = adapter_name or self._active
        config: DPTConfig = self.peft_config[adapter_name]
        new_config = dataclasses.replace(config, class_names=class_names)
        classes = build_label_space(new_config, self._tokenizers[adapter_name], self.text_context_length)
        old_total = self.num_classes(adapter_name)
        new_total = sum(t.num_classes for t in classes.values())
        if config.class_specific_context and new_total != old_total:
            raise ValueError(
                f"class_specific_context=True learned one context per class for {old_total} classes; it cannot "
                f"serve {new_total}. Keep the class count or use an adapter with a shared context."
            )
        config.class_names = class_names
        self._classes[adapter_name] = classes
        if new_total != old_total:
            for _, layer in self._layers():
                if isinstance(layer, VisionPromptLayer) and adapter_name in layer.dpt_class_aware:
                    layer.dpt_class_aware[adapter_name].reset_classifier(new_total)
        self.feature_cache.clear(adapter_name)

    def class_names(self, task: str | None = None, adapter_name: str | None = None) -> list[str]:
        return list(self.task_classes(adapter_name or self._active, task).names)

    def num_classes(self, adapter_name: str | None = None) -> int:
        """Classes of the adapter's whole label space (all tasks)."""
        return sum(t.num_classes for t in self._classes[adapter_name or self._active].values())

    def task_classes(self, adapter_name: str, task: str | None = None) -> TaskClasses:
        """One task's tokenized label space (`task` may be None for a single-task adapter)."""
        tasks = self._classes[adapter_name]
        if task is None:
            if len(tasks) > 1:
                raise ValueError(f"This adapter has several tasks; pass task= one of {sorted(tasks)}.")
            return next(iter(tasks.values()))
        if task not in tasks:
            raise ValueError(f"Unknown task {task!r}; the tasks of adapter {adapter_name!r} are {sorted(tasks)}.")
        return tasks[task]

    # ------------------------------------------------------------------ the per-forward seam
    @contextmanager
    def forward_context(self, **inputs: Any) -> Iterator[ForwardContext]:
        """Hand the wrapped layers what they need for one forward and collect what they produce.

        `inputs` are `ForwardContext` fields (e.g. `bypass=True` for the frozen CLIP, or `capture_layers={3}` and
        `on_layer_input` to receive the tokens entering vision layer 3). The previous context is restored on exit,
        even after an error, so nothing of one forward leaks into the next.
        """
        context = ForwardContext(**inputs)
        previous, self._slot.current = self._slot.current, context
        try:
            yield context
        finally:
            self._slot.current = previous

    # ------------------------------------------------------------------ class side
    def _text_stamp(self) -> tuple:
        weight = self.model.text_projection.weight
        return (weight.device, weight.dtype, torch.is_autocast_enabled(weight.device.type))

    def encode_text(
        self, input_ids: torch.Tensor, layout: PromptLayout | None = None, adapter_name: str | None = None
    ) -> torch.Tensor:
        """Text features `[C, P]` of token ids; with a `layout`, its placeholders become the learned context.

        Class prompts that share leading tokens (SOT + a shared context) go through `encode_with_shared_prefix`,
        which computes those positions once instead of once per class; `text_encoding` picks or forces the path.
        """
        device = self.model.text_projection.weight.device
        adapter_name = adapter_name or self._active
        prefix_length = self._shared_prefix_length(layout, adapter_name)  # on the CPU layout: no device sync
        input_ids = input_ids.to(device)
        layout = None if layout is None else layout.to(device)
        if prefix_length:
            embeddings = self.model.text_model.embeddings.prompt_embeddings(input_ids, layout, adapter_name)
            pooled = encode_with_shared_prefix(self.model.text_model, embeddings, input_ids, prefix_length)
            return self.model.text_projection(pooled)
        with self.forward_context(prompt_layout=layout):
            return self.model.get_text_features(input_ids=input_ids).pooler_output

    def _shared_prefix_length(self, layout: PromptLayout | None, adapter_name: str) -> int:
        """Length of the prefix to encode once, or 0 for the full path (no layout, or `text_encoding` says so)."""
        mode = self.peft_config[adapter_name].text_encoding
        if layout is None or mode == "full" or self.text_context(adapter_name) is None:
            return 0
        if mode == "shared_prefix":
            return shared_prefix_length(layout)
        length = usable_prefix_length(self.model.text_model, layout)
        return length if length >= 2 else 0  # auto: more than SOT to share

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
        if classes.prompt_layout is None or context is None:
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
        classes, config and auxiliary classifier stay as they are. The last one asked is kept per adapter."""
        adapter_name = adapter_name or self._active
        names = tuple(class_names)
        kept = self._other_label_spaces.get(adapter_name)
        if kept is not None and kept.names == names:
            return kept
        config: DPTConfig = self.peft_config[adapter_name]
        if config.class_specific_context and list(names) != self.class_names(adapter_name=adapter_name):
            raise ValueError(
                "This adapter learned one text context per class (class_specific_context=True), so it can only "
                f"classify over its own classes {self.class_names(adapter_name=adapter_name)}, not {list(names)}."
            )
        other = dataclasses.replace(config, class_names=list(names))
        classes = next(
            iter(build_label_space(other, self._tokenizers[adapter_name], self.text_context_length).values())
        )
        self._other_label_spaces[adapter_name] = classes
        return classes

    # ------------------------------------------------------------------ image side and classification
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

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
        return self.model.logit_scale.exp() * _normalize(images) @ _normalize(texts).t().to(images.dtype)

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
