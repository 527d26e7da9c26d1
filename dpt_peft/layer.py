"""The wrapped CLIP modules that carry DPT's prompts, and the kinds of parameter they hold.

`TextContextEmbeddings` wraps `text_model.embeddings` and swaps the learned context in for placeholder
tokens; `VisionPromptLayer` wraps one `CLIPEncoderLayer` of the vision tower and appends that layer's deep
and class-aware prompts to its input, dropping them from its output. Both pass through untouched when
adapters are disabled, so `disable_adapter()` gives the base CLIP exactly.

What a layer needs for one forward (the prompt layout, each image's top-K class features) and what it
produces (auxiliary logits, attention maps, captured inputs) live in a `ForwardContext`, which only
`ForwardContextSlot.install` (the tuner's `forward_context`) creates and always clears. Layers hold the slot (a plain
attribute, never a buffer, so PEFT does not save it) through which they read the current context.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .class_prompts import PromptLayout
from .utils.errors import UserInputError

MERGE_REFUSAL = (
    "DPT's prompts are extra tokens, not a change of the base model's weights, so they cannot be merged into them; "
    "use unload() for the untouched base model, or `with model.disable_adapter():` for a forward without prompts."
)


class ParameterKind(str, enum.Enum):
    """What a prompt parameter is, decided by the layer attribute it lives in (see `DPTLayer.parameter_kinds`)."""

    TEXT_CONTEXT = "text_context"
    VISUAL_PROMPTS = "visual_prompts"
    CLASS_AWARE = "class_aware"
    LORA = "lora"  # a LoRA matrix of `lora_classifier.LoraClassifier` (the --method lora baseline)


@dataclass
class ForwardContext:
    """What the tuner hands to the wrapped layers for one forward, and what they hand back."""

    prompt_layout: PromptLayout | None = None  # class prompts being encoded by the text tower
    class_features: torch.Tensor | None = None  # [B, K, P] learned text features of each image's top-K classes
    bypass: bool = False  # run the frozen CLIP (zero-shot pass, prototype collection)
    record_attention: bool = False  # keep each class-aware layer's attention
    probe_class_features: torch.Tensor | None = None  # [B, M, P]: attention of these classes' prompts, not inserted
    capture_layers: frozenset[int] = frozenset()  # vision layers whose input tokens go to `on_layer_input`
    on_layer_input: Callable[[int, torch.Tensor], None] | None = None  # (layer index, tokens [B, N, D])
    class_aware_logits: list[torch.Tensor] = field(default_factory=list)  # per class-aware layer, [B, K, C]
    class_aware_attentions: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, K, N + kv]
    probe_attentions: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, M, N + kv]


class ForwardContextSlot:
    """The context the wrapped layers read now; an empty context (plain prompting) between forwards."""

    def __init__(self) -> None:
        self.current = ForwardContext()

    @contextmanager
    def install(self, **inputs: Any) -> Iterator[ForwardContext]:
        """A fresh `ForwardContext(**inputs)` for the layers to read and fill; the previous one is restored on exit,
        even after an error, so nothing of one forward leaks into the next."""
        context = ForwardContext(**inputs)
        previous, self.current = self.current, context
        try:
            yield context
        finally:
            self.current = previous


class ClassAwarePromptGenerator(nn.Module):
    """CAVPT for one vision layer (docs/method.md, section 3).

    Queries are the learned text features of an image's top-K classes; keys and values are the layer's input
    tokens (detached) plus `num_kv_tokens` learnable tokens. The attention is written out (not
    `nn.MultiheadAttention`) so that it is one fixed code path: save/reload stays bit-exact and the attention
    map can be read for visualization.
    """

    # Submodules that belong to the training label space: never transferred to another label space.
    class_specific_modules = ("classifier",)

    def __init__(
        self,
        feature_dim: int,
        hidden_size: int,
        num_classes: int,
        num_kv_tokens: int,
        attention_dim: int,
        init_std: float,
    ) -> None:
        super().__init__()
        self.query_proj = nn.Linear(feature_dim, hidden_size)
        self.kv_tokens = nn.Parameter(torch.randn(num_kv_tokens, hidden_size) * init_std)
        self.q_proj = nn.Linear(hidden_size, attention_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, attention_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.prompt_norm = nn.LayerNorm(hidden_size)
        self.classifier_norm = nn.LayerNorm(hidden_size)
        self.classifier = nn.Linear(hidden_size, num_classes, bias=False)
        self.attention_dim = attention_dim

    def forward(
        self, class_features: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return prompts `[B, K, D]`, auxiliary logits `[B, K, C]` and attention `[B, K, N + num_kv_tokens]`."""
        dtype = self.query_proj.weight.dtype
        queries = self.query_proj(class_features.to(dtype))
        kv_tokens = self.kv_tokens.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        keys_values = torch.cat([tokens.detach().to(dtype), kv_tokens], dim=1)
        scores = self.q_proj(queries) @ self.k_proj(keys_values).transpose(1, 2) / math.sqrt(self.attention_dim)
        attention = scores.softmax(dim=-1)
        attended = self.v_proj(attention @ keys_values)
        prompts = self.prompt_norm(attended + queries)
        logits = self.classifier(self.classifier_norm(attended))
        return prompts, logits, attention

    def reset_classifier(self, num_classes: int) -> None:
        """New auxiliary classifier for a new label space (the prompts themselves are kept)."""
        weight = self.classifier.weight
        self.classifier = nn.Linear(weight.shape[1], num_classes, bias=False, device=weight.device, dtype=weight.dtype)


class DPTLayer(BaseTunerLayer):
    """Common behaviour of DPT's wrapped modules.

    `parameter_kinds` maps each adapter attribute of a layer to the kind of its parameters; optimizer groups
    and transfer ask `parameter_kind` rather than matching names, so a new prompt type declares its kind once.
    """

    parameter_kinds: dict[str, ParameterKind] = {}

    def __init__(self, base_layer: nn.Module, slot: ForwardContextSlot) -> None:
        self.base_layer = base_layer
        self._slot = slot
        self._disable_adapters = False
        self.merged_adapters = []

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device | None, None]:
        """The wrapped CLIP module's device (it has no `weight`, which PEFT looks for) and no dtype: prompts stay
        float32 and are cast where used. PEFT moves an adapter there, also after loading it with
        `low_cpu_mem_usage=True` (meta tensors are skipped until then)."""
        parameter = next(base_layer.parameters(), None)
        return (None if parameter is None else parameter.device), None

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(MERGE_REFUSAL)

    def unmerge(self) -> None:
        raise NotImplementedError(MERGE_REFUSAL)

    def move_to_base_layer_device(self, adapter_name: str) -> None:
        """PEFT's own placement of an adapter's tensors next to the wrapped module (see above)."""
        self._move_adapter_to_device_of_base_layer(adapter_name)

    @property
    def context(self) -> ForwardContext:
        return self._slot.current

    @property
    def _prompting_adapter(self) -> str | None:
        """The adapter whose prompts apply now, or None to behave exactly like the base module."""
        if self.disable_adapters or self.context.bypass or not self.active_adapters:
            return None
        if len(self.active_adapters) > 1:
            raise UserInputError(
                f"DPT applies one adapter at a time, but {self.active_adapters} are active; choose one with "
                "model.set_adapter(name)."
            )
        return self.active_adapters[0]

    def adapter_parameters(self, adapter_name: str) -> Iterator[tuple[str, ParameterKind, nn.Parameter]]:
        """`(name relative to this layer, kind, parameter)` for every parameter of `adapter_name`, as saved."""
        for attribute, kind in self.parameter_kinds.items():
            container = getattr(self, attribute)
            if adapter_name not in container:
                continue
            entry = container[adapter_name]
            if isinstance(entry, nn.Parameter):
                yield attribute, kind, entry
            else:
                for name, parameter in entry.named_parameters():
                    yield f"{attribute}.{name}", kind, parameter


class TextContextEmbeddings(nn.Module, DPTLayer):
    """Wraps `CLIPTextEmbeddings`: placeholder tokens of class prompts become the learned context."""

    parameter_kinds = {"dpt_context": ParameterKind.TEXT_CONTEXT}
    adapter_layer_names = tuple(parameter_kinds)

    def __init__(self, base_layer: nn.Module, slot: ForwardContextSlot) -> None:
        nn.Module.__init__(self)
        DPTLayer.__init__(self, base_layer, slot)
        self.dpt_context = nn.ParameterDict()

    @property
    def token_embedding(self) -> nn.Embedding:
        """The text encoder's vocabulary embedding (context init, nearest-token inspection)."""
        return self.base_layer.token_embedding

    def update_layer(self, adapter_name: str, context: torch.Tensor) -> None:
        """Add the context `[n_ctx, E]` (shared) or `[C, n_ctx, E]` (class-specific) of an adapter."""
        self.dpt_context[adapter_name] = nn.Parameter(context.detach().clone().float())
        self.set_adapter(self.active_adapters)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        adapter = self._prompting_adapter
        layout = self.context.prompt_layout
        if adapter is None or layout is None or adapter not in self.dpt_context:
            return self.base_layer(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds)
        embeds = self.prompt_embeddings(input_ids, layout, adapter)
        return self.base_layer(position_ids=position_ids, inputs_embeds=embeds)

    def prompt_embeddings(self, input_ids: torch.Tensor, layout: PromptLayout, adapter_name: str) -> torch.Tensor:
        """Token embeddings `[C, T, E]` of class prompts with the learned context in place of the placeholders
        (no position embeddings yet)."""
        token_embeds = self.base_layer.token_embedding(input_ids)
        context = self.dpt_context[adapter_name]
        context_rows = context.reshape(-1, context.shape[-1])[layout.context_index].to(token_embeds.dtype)
        return torch.where(layout.context_mask.unsqueeze(-1), context_rows, token_embeds)


class VisionPromptLayer(nn.Module, DPTLayer):
    """Wraps one vision `CLIPEncoderLayer`: its prompts join the tokens for this layer only (VPT-deep, CAVPT).

    Prompts are appended after the patch tokens and carry no position embedding; the outputs at their
    positions are dropped, so the next layer sees CLS + patches as in CLIP.
    """

    parameter_kinds = {"dpt_visual_prompts": ParameterKind.VISUAL_PROMPTS, "dpt_class_aware": ParameterKind.CLASS_AWARE}
    adapter_layer_names = tuple(parameter_kinds)

    def __init__(self, base_layer: nn.Module, slot: ForwardContextSlot, layer_index: int) -> None:
        nn.Module.__init__(self)
        DPTLayer.__init__(self, base_layer, slot)
        self.layer_index = layer_index
        self.dpt_visual_prompts = nn.ParameterDict()
        self.dpt_class_aware = nn.ModuleDict()

    def update_layer(
        self,
        adapter_name: str,
        visual_prompts: torch.Tensor | None,
        class_aware: ClassAwarePromptGenerator | None,
    ) -> None:
        if visual_prompts is not None:
            self.dpt_visual_prompts[adapter_name] = nn.Parameter(visual_prompts.detach().clone().float())
        if class_aware is not None:
            self.dpt_class_aware[adapter_name] = class_aware
        self.set_adapter(self.active_adapters)

    def _class_aware_prompts(self, adapter: str, hidden_states: torch.Tensor) -> torch.Tensor:
        context = self.context
        if context.class_features is None:
            raise RuntimeError(
                f"Vision layer {self.layer_index} has class-aware prompts, which need the class features of "
                "each image's top-K classes; call the PEFT model itself (model(pixel_values=...)) rather than "
                "the vision tower, or run it under model.disable_adapter()."
            )
        generator = self.dpt_class_aware[adapter]
        prompts, logits, attention = generator(context.class_features, hidden_states)
        context.class_aware_logits.append(logits)
        if context.record_attention:
            context.class_aware_attentions[self.layer_index] = attention
        if context.probe_class_features is not None:
            context.probe_attentions[self.layer_index] = generator(context.probe_class_features, hidden_states)[2]
        return prompts

    def _prompts(self, adapter: str, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        prompts = []
        if adapter in self.dpt_visual_prompts:
            visual = self.dpt_visual_prompts[adapter].to(hidden_states.dtype)
            prompts.append(visual.unsqueeze(0).expand(hidden_states.shape[0], -1, -1))
        if adapter in self.dpt_class_aware:
            prompts.append(self._class_aware_prompts(adapter, hidden_states).to(hidden_states.dtype))
        return prompts

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.layer_index in self.context.capture_layers:
            self.context.on_layer_input(self.layer_index, hidden_states)
        adapter = self._prompting_adapter
        prompts = [] if adapter is None else self._prompts(adapter, hidden_states)
        if not prompts:
            return self.base_layer(hidden_states, *args, **kwargs)
        num_tokens = hidden_states.shape[1]
        output = self.base_layer(torch.cat([hidden_states, *prompts], dim=1), *args, **kwargs)
        return output[:, :num_tokens]


LAYER_TYPES: tuple[type[DPTLayer], ...] = (TextContextEmbeddings, VisionPromptLayer)
_KIND_OF_ATTRIBUTE = {attribute: kind for layer in LAYER_TYPES for attribute, kind in layer.parameter_kinds.items()}


def parameter_kind(key: str) -> ParameterKind | None:
    """Kind of a saved or named parameter (`...layers.11.dpt_class_aware.q_proj.weight`), from its attribute."""
    for part in key.split("."):
        if part in _KIND_OF_ATTRIBUTE:
            return _KIND_OF_ATTRIBUTE[part]
    return None


def is_class_specific(key: str, class_specific_context: bool) -> bool:
    """Whether a saved tensor belongs to its adapter's label space (MVLPT transfer leaves those out)."""
    kind = parameter_kind(key)
    if kind is ParameterKind.CLASS_AWARE:
        return any(f".{module}." in f".{key}." for module in ClassAwarePromptGenerator.class_specific_modules)
    return kind is ParameterKind.TEXT_CONTEXT and class_specific_context
