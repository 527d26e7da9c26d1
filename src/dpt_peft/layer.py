"""The wrapped CLIP modules that carry DPT's prompts.

`TextContextEmbeddings` wraps `text_model.embeddings` and swaps the learned context in for placeholder
tokens; `VisionPromptLayer` wraps one `CLIPEncoderLayer` of the vision tower and appends that layer's deep
and class-aware prompts to its input, dropping them from its output. Both pass through untouched when
adapters are disabled, so `disable_adapter()` gives the base CLIP exactly.

Per-forward inputs (the prompt layout, the class features of each image's top-K classes) and outputs (the
auxiliary logits) travel in a `ForwardState` shared with the tuner. It is a plain object, never a buffer,
so PEFT does not save it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .class_prompts import PromptLayout


@dataclass
class ForwardState:
    """What the tuner hands to the wrapped layers for one forward, and what they hand back."""

    prompt_layout: Optional[PromptLayout] = None
    class_features: Optional[torch.Tensor] = None  # [B, K, P] learned text features of each image's top-K classes
    bypass: bool = False  # run the frozen CLIP (zero-shot pass, prototype collection)
    class_aware_logits: list[torch.Tensor] = field(default_factory=list)
    class_aware_attention: list[torch.Tensor] = field(default_factory=list)
    record_attention: bool = False

    def reset_outputs(self) -> None:
        self.class_aware_logits = []
        self.class_aware_attention = []


class ClassAwarePromptGenerator(nn.Module):
    """CAVPT for one vision layer (METHOD.md section 3, steps 2-6).

    Queries are the learned text features of an image's top-K classes; keys and values are the layer's input
    tokens (detached) plus `num_kv_tokens` learnable tokens. The attention is written out (not
    `nn.MultiheadAttention`) so that it is one fixed code path: save/reload stays bit-exact and the attention
    map can be read for visualization.
    """

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
    """Common behaviour of DPT's wrapped modules."""

    def __init__(self, base_layer: nn.Module, state: ForwardState) -> None:
        self.base_layer = base_layer
        self._state = state
        self._disable_adapters = False
        self.merged_adapters = []

    @property
    def _prompting_adapter(self) -> Optional[str]:
        """The adapter whose prompts apply now, or None to behave exactly like the base module."""
        if self.disable_adapters or self._state.bypass or not self.active_adapters:
            return None
        if len(self.active_adapters) > 1:
            raise ValueError(
                f"DPT applies one adapter at a time, but {self.active_adapters} are active; choose one with "
                "model.set_adapter(name)."
            )
        return self.active_adapters[0]


class TextContextEmbeddings(nn.Module, DPTLayer):
    """Wraps `CLIPTextEmbeddings`: placeholder tokens of class prompts become the learned context."""

    adapter_layer_names = ("dpt_context",)

    def __init__(self, base_layer: nn.Module, state: ForwardState) -> None:
        nn.Module.__init__(self)
        DPTLayer.__init__(self, base_layer, state)
        self.dpt_context = nn.ParameterDict()

    def update_layer(self, adapter_name: str, context: torch.Tensor) -> None:
        """Add the context `[n_ctx, E]` (shared) or `[C, n_ctx, E]` (class-specific) of an adapter."""
        self.dpt_context[adapter_name] = nn.Parameter(context.detach().clone().float())
        self.set_adapter(self.active_adapters)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        adapter = self._prompting_adapter
        layout = self._state.prompt_layout
        if adapter is None or layout is None or adapter not in self.dpt_context:
            return self.base_layer(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds)
        token_embeds = self.base_layer.token_embedding(input_ids)
        context = self.dpt_context[adapter]
        context_rows = context.reshape(-1, context.shape[-1])[layout.context_index].to(token_embeds.dtype)
        embeds = torch.where(layout.context_mask.unsqueeze(-1), context_rows, token_embeds)
        return self.base_layer(position_ids=position_ids, inputs_embeds=embeds)


class VisionPromptLayer(nn.Module, DPTLayer):
    """Wraps one vision `CLIPEncoderLayer`: its prompts join the tokens for this layer only (VPT-deep, CAVPT).

    Prompts are appended after the patch tokens and carry no position embedding; the outputs at their
    positions are dropped, so the next layer sees CLS + patches as in CLIP.
    """

    adapter_layer_names = ("dpt_visual_prompts", "dpt_class_aware")

    def __init__(self, base_layer: nn.Module, state: ForwardState, layer_index: int) -> None:
        nn.Module.__init__(self)
        DPTLayer.__init__(self, base_layer, state)
        self.layer_index = layer_index
        self.dpt_visual_prompts = nn.ParameterDict()
        self.dpt_class_aware = nn.ModuleDict()

    def update_layer(
        self,
        adapter_name: str,
        visual_prompts: Optional[torch.Tensor],
        class_aware: Optional[ClassAwarePromptGenerator],
    ) -> None:
        if visual_prompts is not None:
            self.dpt_visual_prompts[adapter_name] = nn.Parameter(visual_prompts.detach().clone().float())
        if class_aware is not None:
            self.dpt_class_aware[adapter_name] = class_aware
        self.set_adapter(self.active_adapters)

    def _prompts(self, adapter: str, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        prompts = []
        batch = hidden_states.shape[0]
        if adapter in self.dpt_visual_prompts:
            prompts.append(self.dpt_visual_prompts[adapter].to(hidden_states.dtype).unsqueeze(0).expand(batch, -1, -1))
        if adapter in self.dpt_class_aware:
            class_features = self._state.class_features
            if class_features is None:
                raise RuntimeError(
                    f"Vision layer {self.layer_index} has class-aware prompts, which need the class features of "
                    "each image's top-K classes; call the PEFT model itself (model(pixel_values=...)) rather than "
                    "the vision tower, or run it under model.disable_adapter()."
                )
            class_prompts, logits, attention = self.dpt_class_aware[adapter](class_features, hidden_states)
            self._state.class_aware_logits.append(logits)
            if self._state.record_attention:
                self._state.class_aware_attention.append(attention)
            prompts.append(class_prompts.to(hidden_states.dtype))
        return prompts

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._prompting_adapter
        prompts = [] if adapter is None else self._prompts(adapter, hidden_states)
        if not prompts:
            return self.base_layer(hidden_states, *args, **kwargs)
        num_tokens = hidden_states.shape[1]
        output = self.base_layer(torch.cat([hidden_states, *prompts], dim=1), *args, **kwargs)
        return output[:, :num_tokens]
