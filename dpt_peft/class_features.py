"""`ClassFeatures`: the text features of each adapter's classes, owned by the tuner (docs/method.md, section 1).

Encoding every class prompt is the text encoder's whole work. This component picks the text path (the full text
tower, or the shared prefix encoded once), computes the class features with the learned context and the frozen
zero-shot ones, and keeps them between calls: at inference (no gradient) they only change when the prompts, the
class names, the device, the dtype or autocast change, so each entry carries a stamp of those and a lookup with
another stamp recomputes. The tuner hands it the backbone and the forward-context slot once, and an adapter's name,
config and classes per call; it never reaches back into the tuner.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from torch import nn

from .backbones import Backbone
from .class_prompts import PromptLayout, TaskClasses
from .config import DPTConfig
from .consistency import consistency_on, consistency_template_ids
from .label_space import LabelSpaces
from .layer import ForwardContextSlot, TextContextEmbeddings
from .shared_prefix import encode_with_shared_prefix, shared_prefix_length, usable_prefix_length
from .utils.stamped_cache import StampedCache


class ClassFeatures:
    """Learned and zero-shot class features `[C, P]` of a tuner's adapters, cached where that is exact."""

    def __init__(self, backbone: Backbone, slot: ForwardContextSlot) -> None:
        self._backbone = backbone
        self._slot = slot
        self._cache = StampedCache()

    def text_context(self, adapter_name: str) -> nn.Parameter | None:
        """The learned context of an adapter (`[n_ctx, E]` or `[C, n_ctx, E]`), or None when it learns none."""
        embeddings = self._backbone.text_embeddings
        if isinstance(embeddings, TextContextEmbeddings) and adapter_name in embeddings.dpt_context:
            return embeddings.dpt_context[adapter_name]
        return None

    def learned(self, adapter_name: str, config: DPTConfig, classes: TaskClasses) -> torch.Tensor:
        """Text features of the class prompts with the learned context `[C, P]` (un-normalized)."""
        context = self.text_context(adapter_name)
        # After `disable_adapter_layers()` (PEFT's switch, held by the wrapped layers) classify as the base model.
        if classes.prompt_layout is None or context is None or self._backbone.text_embeddings.disable_adapters:
            return self.zero_shot(adapter_name, config, classes)
        layout = classes.prompt_layout
        return self._cached(
            (adapter_name, classes.names, "learned"),
            lambda: (*self._stamp(), context._version, context.data_ptr()),
            lambda: self.encode_text(layout.input_ids, layout, adapter_name, config.text_encoding),
            config.cache_class_features,
        )

    def zero_shot(self, adapter_name: str, config: DPTConfig, classes: TaskClasses) -> torch.Tensor:
        """Frozen text features of `zero_shot_template` for each class `[C, P]`."""

        def compute() -> torch.Tensor:
            with self._slot.install(bypass=True):
                return self.encode_text(classes.template_ids, None, adapter_name, config.text_encoding)

        key = (adapter_name, classes.names, "zero_shot")
        with torch.no_grad():
            return self._cached(key, self._stamp, compute, config.cache_class_features)

    def consistency_targets(
        self, adapter_name: str, config: DPTConfig, classes: TaskClasses, label_spaces: LabelSpaces
    ) -> torch.Tensor | None:
        """Frozen class features `[C, P]` the self-consistency terms aim at (None when they are off): the zero-shot
        ones, or the average over `config.consistency_templates`, tokenized with the adapter's tokenizer on a cache
        miss only. The un-normalized features are averaged, as PromptSRC's targets (`VLPromptLearner.__init__`)."""
        if not consistency_on(config.consistency_weights):
            return None
        if config.consistency_templates is None:
            return self.zero_shot(adapter_name, config, classes)

        def compute() -> torch.Tensor:
            tokenizer, prompt_format = label_spaces.tokenizer(adapter_name), label_spaces.prompt_format(adapter_name)
            all_ids = consistency_template_ids(
                tokenizer,
                prompt_format,
                list(classes.names),
                config.consistency_templates,
                self._backbone.text_context_length,
                config.pad_text_to_context,
            )
            with self._slot.install(bypass=True):
                features = [self.encode_text(ids, None, adapter_name, config.text_encoding) for ids in all_ids]
            return torch.stack(features).mean(dim=0)

        key = (adapter_name, classes.names, "consistency", tuple(config.consistency_templates))
        with torch.no_grad():
            return self._cached(key, self._stamp, compute, config.cache_class_features)

    def encode_text(
        self, input_ids: torch.Tensor, layout: PromptLayout | None, adapter_name: str, text_encoding: str
    ) -> torch.Tensor:
        """Text features `[C, P]` of token ids; with a `layout`, its placeholders become the adapter's context.

        Class prompts that share leading tokens (SOT + a shared context) go through `encode_with_shared_prefix`,
        which computes those positions once instead of once per class; `text_encoding` picks or forces the path.
        """
        device = self._backbone.text_parameter.device
        prefix_length = self.shared_prefix_length(layout, adapter_name, text_encoding)  # CPU layout: no device sync
        input_ids = input_ids.to(device)
        layout = None if layout is None else layout.to(device)
        if prefix_length:
            embeddings = self._backbone.text_embeddings.prompt_embeddings(input_ids, layout, adapter_name)
            pooled = encode_with_shared_prefix(self._backbone, embeddings, input_ids, prefix_length)
            return self._backbone.project_text(pooled)
        with self._slot.install(prompt_layout=layout):
            return self._backbone.text_features(input_ids)

    def shared_prefix_length(self, layout: PromptLayout | None, adapter_name: str, text_encoding: str) -> int:
        """Length of the prefix to encode once, or 0 for the full path (no layout, or `text_encoding` says so)."""
        if layout is None or text_encoding == "full" or self.text_context(adapter_name) is None:
            return 0
        if text_encoding == "shared_prefix":
            return shared_prefix_length(layout)
        length = usable_prefix_length(self._backbone, layout)
        return length if length >= 2 else 0  # auto: more than SOT to share

    def clear(self, adapter_name: str | None = None) -> None:
        """Forget one adapter's features (its prompts or class names changed), or all of them."""
        self._cache.forget(lambda key: adapter_name is None or key[0] == adapter_name)

    def _stamp(self) -> tuple:
        """What class features depend on besides the prompts: where and in which precision they were computed."""
        weight = self._backbone.text_parameter
        return (weight.device, weight.dtype, torch.is_autocast_enabled(weight.device.type))

    def _cached(
        self, key: tuple, stamp: Callable[[], Hashable], compute: Callable[[], torch.Tensor], enabled: bool
    ) -> torch.Tensor:
        """`compute()`, or its result kept under `key` while `stamp()` is unchanged and no gradient is needed."""
        return self._cache.get(key, stamp, compute) if enabled else compute()
