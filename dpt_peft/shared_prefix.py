"""Encode the leading tokens that all class prompts share once, instead of once per class.

With a shared learned context every class prompt starts with the same tokens: SOT + the context (`"end"`
layout) or SOT + its first half (`"middle"`). CLIP's text encoder is causal, so at every layer the hidden
states at those positions are identical for all C classes, yet the full path computes them C times (1000 for
ImageNet: about half of a training step). Here that prefix runs through each layer once, as one sequence,
and each class's own tokens attend to the prefix's keys and values (broadcast over classes, never copied per
class) plus their own under the causal mask. The pooled features equal CLIP's, and autograd sums the
context's gradient over classes through the single prefix pass.

The attention is written out with `eager_attention_forward`'s semantics (scores scaled after the matmul,
softmax in float32, then back to the query dtype) whatever attention implementation the config selects, from each
layer's own modules and weights, as the backbone seam hands them over, so any causal pre-LayerNorm text tower works.
A bidirectional tower (SigLIP's) shares nothing: every position sees the class tokens, so it takes the full path.
Layer hooks (`output_hidden_states`, `output_attentions`) and gradient checkpointing do not apply to this path.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbones import Backbone
from .class_prompts import PromptLayout
from .utils.errors import UserInputError


def shared_prefix_length(layout: PromptLayout) -> int:
    """Leading positions whose embeddings are the same in every prompt: same token and same context row (or none).

    1 (only SOT) for the `"front"` layout and class-specific contexts; `1 + n_ctx` for `"end"` and
    `1 + n_ctx // 2` for `"middle"` with a shared context (more when all class names start with the same
    token). When all prompts are the same (a single class) this covers their EOT, which
    `encode_with_shared_prefix` rejects: encode such a layout with the full text encoder.
    """
    ids, mask, index = layout.input_ids, layout.context_mask, layout.context_index
    same = (ids == ids[:1]).all(0) & (mask == mask[:1]).all(0) & ((index == index[:1]) | ~mask).all(0)
    return int(same.long().cumprod(0).sum())


def _attention_dropout_active(backbone: Backbone) -> bool:
    return any(layer.self_attn.training and layer.self_attn.dropout > 0 for layer in backbone.text_layers)


def usable_prefix_length(backbone: Backbone, layout: PromptLayout) -> int:
    """`shared_prefix_length(layout)` when `encode_with_shared_prefix` can encode these prompts, else 0: the text
    tower must be causal, the prefix must end before every prompt's pooled position, and attention dropout must be
    off."""
    if not backbone.causal_text:
        return 0
    length = shared_prefix_length(layout)
    first_pooled = int(backbone.pooled_positions(layout.input_ids).min())
    return length if 1 <= length <= first_pooled and not _attention_dropout_active(backbone) else 0


def _encoder_layer(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    prefix_keys_values: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """`layer` (a pre-LayerNorm encoder layer: `layer_norm1`, `self_attn`, `layer_norm2`, `mlp`) on `hidden_states`
    `[B, L, E]`, whose queries first see the prefix's keys and values.

    `prefix_keys_values` are `[H, P, d]` each, shared by all B sequences: `einsum` folds B into the rows of one
    matmul per head, so they are never copied per sequence. Their scores are concatenated (along the key axis)
    with the causal scores of the sequences' own keys before one softmax. Returns the layer's output and its
    own keys and values `[B, H, L, d]`.
    """
    attention = layer.self_attn
    batch, length, _ = hidden_states.shape
    normed = layer.layer_norm1(hidden_states)

    def heads(projection: nn.Linear) -> torch.Tensor:
        return projection(normed).view(batch, length, -1, attention.head_dim).transpose(1, 2)

    queries, keys, values = heads(attention.q_proj), heads(attention.k_proj), heads(attention.v_proj)
    scores = torch.matmul(queries, keys.transpose(-1, -2)) * attention.scale
    future = torch.ones(length, length, dtype=torch.bool, device=scores.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    if prefix_keys_values is not None:
        prefix_keys, prefix_values = prefix_keys_values
        prefix_scores = torch.einsum("bhld,hpd->bhlp", queries, prefix_keys) * attention.scale
        scores = torch.cat([prefix_scores, scores], dim=-1)
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(queries.dtype)
    attended = torch.matmul(weights[..., -length:], values)
    if prefix_keys_values is not None:
        attended = attended + torch.einsum("bhlp,hpd->bhld", weights[..., :-length], prefix_values)
    attended = attention.out_proj(attended.transpose(1, 2).reshape(batch, length, -1))
    hidden_states = hidden_states + attended
    hidden_states = hidden_states + layer.mlp(layer.layer_norm2(hidden_states))
    return hidden_states, (keys, values)


def encode_with_shared_prefix(
    backbone: Backbone,
    inputs_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    prefix_length: int,
) -> torch.Tensor:
    """The text tower's pooled, normalized output `[C, E]` (before the projection), computing the shared prefix once.

    `inputs_embeds` `[C, T, E]` are the token embeddings with the context swapped in, without position
    embeddings; their first `prefix_length` positions must be the same in every row (see
    `shared_prefix_length`): only row 0's are read. `input_ids` `[C, T]` only choose the pooled (EOT) position,
    as the backbone does.

    Raises a `ValueError`, for the caller to use the full text encoder instead, when the text tower is not causal
    (every position sees the class tokens, so no prefix is shared), when `prefix_length` is below 1
    or reaches a prompt's pooled position (all prompts the same, e.g. a single class), and when attention
    dropout is active (training with `attention_dropout > 0` would give each class its own prefix states).
    """
    if not backbone.causal_text:
        raise UserInputError(
            f"The {backbone.family} text tower attends in both directions, so the prefix's hidden states depend on the "
            "class tokens and cannot be shared; use text_encoding='full' (or 'auto')."
        )
    num_prompts, length, _ = inputs_embeds.shape
    if input_ids.shape != (num_prompts, length):
        raise ValueError(f"input_ids {tuple(input_ids.shape)} do not match inputs_embeds {tuple(inputs_embeds.shape)}.")
    position_embedding = backbone.position_embedding
    if length > position_embedding.num_embeddings:
        raise UserInputError(
            f"Prompts of {length} tokens exceed the text encoder's {position_embedding.num_embeddings} positions."
        )
    pooled_positions = backbone.pooled_positions(input_ids).to(inputs_embeds.device)
    if prefix_length < 1 or bool((pooled_positions < prefix_length).any()):
        raise UserInputError(
            f"A shared prefix of {prefix_length} tokens is unusable for prompts whose first pooled (EOT) position is "
            f"{int(pooled_positions.min())}: it needs at least 1 token and must end before every prompt's EOT. "
            "Encode these prompts with the full text encoder."
        )
    if _attention_dropout_active(backbone):
        raise UserInputError(
            "The text encoder is in training mode with attention_dropout > 0, so each class would see its own "
            "dropped-out prefix; encode with the full text encoder, or call eval() on the text model."
        )
    positions = torch.arange(length, device=inputs_embeds.device)
    hidden_states = inputs_embeds + position_embedding(positions)
    prefix, own = hidden_states[:1, :prefix_length], hidden_states[:, prefix_length:]
    for layer in backbone.text_layers:
        prefix, (keys, values) = _encoder_layer(layer, prefix, None)
        own, _ = _encoder_layer(layer, own, (keys[0], values[0]))
    pooled = own[torch.arange(num_prompts, device=own.device), pooled_positions - prefix_length]
    return backbone.final_text_norm(pooled)
