"""`DPTModel`: the PEFT tuner that wires DPT's prompts into a `transformers.CLIPModel` and classifies with them."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .backbones import Backbone, backbone_for
from .class_prompts import PromptLayout, TaskClasses
from .classification import ClassificationMixin
from .config import DPTConfig
from .feature_cache import ClassFeatureCache
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
from .shared_prefix import encode_with_shared_prefix, shared_prefix_length, usable_prefix_length
from .sources import recorded_name, resolve
from .transfer import copy_shared_tensors, shared_source_tensors


class DPTModel(ClassificationMixin, BaseTuner):
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
        self.feature_cache = ClassFeatureCache()

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        """Validate everything against the base model first, so a bad config leaves the CLIP untouched."""
        config: DPTConfig = self.peft_config[adapter_name]
        config.validate_for_model(self.backbone)
        tokenizer = self._load_tokenizer(config)
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

    def _load_tokenizer(self, config: DPTConfig) -> PreTrainedTokenizerBase:
        # The CLIP passed in comes first: the path recorded at training time may not exist on this machine.
        source = config.tokenizer_name_or_path or self.model.name_or_path or config.base_model_name_or_path
        if not source:
            raise ValueError(
                "No CLIP tokenizer found: the base model has no name_or_path (built from a config?). Set "
                "tokenizer_name_or_path in DPTConfig to a directory or Hub id with the CLIP tokenizer."
            )
        loaded = self.label_spaces.tokenizer_from(source)
        if loaded is not None:
            return loaded
        try:
            return AutoTokenizer.from_pretrained(resolve(source))
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

    def unload(self) -> nn.Module:
        """Put the original modules back and return the untouched base model (e.g. the `CLIPModel`)."""
        for name, module in list(self.model.named_modules()):
            if isinstance(module, DPTLayer):
                parent_name, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent_name), child, module.base_layer)
        self.feature_cache.clear()
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
        embeddings = self.backbone.text_embeddings
        if isinstance(embeddings, TextContextEmbeddings) and adapter_name in embeddings.dpt_context:
            return embeddings.dpt_context[adapter_name]
        return None

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
            raise ValueError(
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
        self.feature_cache.clear(adapter_name)

    def class_names(self, task: str | None = None, adapter_name: str | None = None) -> list[str]:
        return list(self.task_classes(adapter_name or self._active, task).names)

    def num_classes(self, adapter_name: str | None = None) -> int:
        """Classes of the adapter's whole label space (all tasks)."""
        return self.label_spaces.num_classes(adapter_name or self._active)

    def task_classes(self, adapter_name: str, task: str | None = None) -> TaskClasses:
        """One task's tokenized label space (`task` may be None for a single-task adapter)."""
        return self.label_spaces.task_classes(adapter_name, task)

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

    # ------------------------------------------------------------------ text encoding
    def encode_text(
        self, input_ids: torch.Tensor, layout: PromptLayout | None = None, adapter_name: str | None = None
    ) -> torch.Tensor:
        """Text features `[C, P]` of token ids; with a `layout`, its placeholders become the learned context.

        Class prompts that share leading tokens (SOT + a shared context) go through `encode_with_shared_prefix`,
        which computes those positions once instead of once per class; `text_encoding` picks or forces the path.
        """
        device = self.backbone.text_parameter.device
        adapter_name = adapter_name or self._active
        prefix_length = self._shared_prefix_length(layout, adapter_name)  # on the CPU layout: no device sync
        input_ids = input_ids.to(device)
        layout = None if layout is None else layout.to(device)
        if prefix_length:
            embeddings = self.backbone.text_embeddings.prompt_embeddings(input_ids, layout, adapter_name)
            pooled = encode_with_shared_prefix(self.backbone, embeddings, input_ids, prefix_length)
            return self.backbone.project_text(pooled)
        with self.forward_context(prompt_layout=layout):
            return self.backbone.text_features(input_ids)

    def _shared_prefix_length(self, layout: PromptLayout | None, adapter_name: str) -> int:
        """Length of the prefix to encode once, or 0 for the full path (no layout, or `text_encoding` says so)."""
        mode = self.peft_config[adapter_name].text_encoding
        if layout is None or mode == "full" or self.text_context(adapter_name) is None:
            return 0
        if mode == "shared_prefix":
            return shared_prefix_length(layout)
        length = usable_prefix_length(self.backbone, layout)
        return length if length >= 2 else 0  # auto: more than SOT to share
