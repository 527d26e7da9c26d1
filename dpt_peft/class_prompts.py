"""The tokenized label space: class prompt layouts (where the learned context goes) and template ids.

The learned context replaces placeholder tokens in `input_ids`, so CLIP's own EOT pooling (which reads
`input_ids`) keeps working. Prompts are cut right after the longest prompt's EOT: under causal attention
the tokens after a prompt's EOT never change its feature, so this is exact and saves most of the
text encoder's work (CLIP pads to 77 tokens; a typical prompt has 10 to 25).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from .backbones import PromptFormat
from .class_names import normalize_class_name
from .config import DPTConfig
from .utils.errors import UserInputError


@dataclass(frozen=True)
class PromptLayout:
    """Token ids of `num_classes` prompts plus where the context vectors go.

    `context_index[c, t]` is the row of the (flattened) context that replaces token `t` of prompt `c`,
    valid where `context_mask[c, t]` is True.
    """

    input_ids: torch.Tensor  # [C, T]
    context_mask: torch.Tensor  # [C, T] bool
    context_index: torch.Tensor  # [C, T] long

    def to(self, device: torch.device) -> PromptLayout:
        if self.input_ids.device == device:
            return self
        return PromptLayout(*(t.to(device) for t in (self.input_ids, self.context_mask, self.context_index)))


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _placeholder_id(tokenizer: PreTrainedTokenizerBase, prompt_format: PromptFormat) -> int:
    """Token id that stands in for context vectors (CoOp uses "X"); any id below the end token works."""
    ids = _encode(tokenizer, "X")
    return ids[0] if len(ids) == 1 and ids[0] < prompt_format.end_id else 0


def _framed(prompt_format: PromptFormat, ids: list[int]) -> list[int]:
    """`ids` between the family's start token (if it has one) and its end token."""
    start = [] if prompt_format.start_id is None else [prompt_format.start_id]
    return start + ids + [prompt_format.end_id]


def _check_name_ids(prompt_format: PromptFormat, name: str, ids: list[int], where: str) -> None:
    if not ids:
        raise UserInputError(f"{where}: {name!r} gives no tokens; use text with letters or digits.")
    special = {prompt_format.end_id, prompt_format.start_id}
    if special & set(ids):
        raise UserInputError(
            f"{where}: {name!r} tokenizes to a start/end-of-text token (characters unknown to the tokenizer), "
            "which would break EOT pooling; change the text or use the model's own tokenizer."
        )


def _pad(rows: list[list[int]], pad_value: int, length: int) -> torch.Tensor:
    return torch.tensor([row + [pad_value] * (length - len(row)) for row in rows], dtype=torch.long)


def build_prompt_layout(
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: PromptFormat,
    class_names: list[str],
    num_context: int,
    position: Literal["end", "middle", "front"],
    max_length: int,
    class_offset: int = 0,
    class_specific: bool = False,
    pad_to: int | None = None,
) -> PromptLayout:
    """Layout of `"X ... X {name}."` prompts (docs/method.md, section 1).

    `class_offset` numbers the classes of this task inside a larger label space (multitask adapters),
    which is how class-specific contexts are indexed. `pad_to` pads every prompt to that length instead of
    the longest prompt (the reference's behaviour, kept for benchmarking).
    """
    placeholder = _placeholder_id(tokenizer, prompt_format)
    period = _encode(tokenizer, ".")
    rows, masks, indices = [], [], []
    for c, name in enumerate(class_names):
        name_ids = _encode(tokenizer, normalize_class_name(name))
        _check_name_ids(prompt_format, name, name_ids, "class_names")
        split = {"end": num_context, "middle": num_context // 2, "front": 0}[position]
        ctx_a, ctx_b = range(split), range(split, num_context)
        tokens = _framed(prompt_format, [placeholder] * len(ctx_a) + name_ids + [placeholder] * len(ctx_b) + period)
        starts = 0 if prompt_format.start_id is None else 1
        context_rows = [None] * starts + [*ctx_a, *[None] * len(name_ids), *ctx_b, *[None] * (len(period) + 1)]
        segments = list(zip(tokens, context_rows))
        if len(segments) > max_length:
            raise UserInputError(
                f"The prompt for class {name!r} is {len(segments)} tokens long ({num_context} context tokens + the "
                f"name), more than the text encoder's context of {max_length}; shorten the class name or reduce "
                "num_text_tokens."
            )
        base = (class_offset + c) * num_context if class_specific else 0
        rows.append([token for token, _ in segments])
        masks.append([j is not None for _, j in segments])
        indices.append([0 if j is None else base + j for _, j in segments])
    length = pad_to or max(len(row) for row in rows)
    return PromptLayout(
        input_ids=_pad(rows, prompt_format.pad_id, length),
        context_mask=_pad([[int(m) for m in row] for row in masks], 0, length).bool(),
        context_index=_pad(indices, 0, length),
    )


def build_template_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: PromptFormat,
    class_names: list[str],
    template: str,
    max_length: int,
    pad_to: int | None = None,
    field: str = "zero_shot_template",
) -> torch.Tensor:
    """Token ids of hand-crafted prompts such as `"a photo of a {name}."`, cut after the longest EOT; a refusal names
    `field`, the config field the template came from."""
    rows = []
    for name in class_names:
        text = template.format(normalize_class_name(name))
        text_ids = _encode(tokenizer, text)
        _check_name_ids(prompt_format, name, text_ids, field)
        ids = _framed(prompt_format, text_ids)
        if len(ids) > max_length:
            raise UserInputError(
                f"The zero-shot prompt {text!r} for class {name!r} is {len(ids)} tokens long, more than the text "
                f"encoder's context of {max_length}; shorten the class name or {field}."
            )
        rows.append(ids)
    return _pad(rows, prompt_format.pad_id, pad_to or max(len(row) for row in rows))


def context_init_ids(tokenizer: PreTrainedTokenizerBase, prompt_format: PromptFormat, phrase: str) -> list[int]:
    """Token ids of an init phrase: their embeddings become the initial context (CoOp's `ctx_init`)."""
    ids = _encode(tokenizer, normalize_class_name(phrase))
    _check_name_ids(prompt_format, phrase, ids, "text_init")
    return ids


@dataclass(frozen=True)
class TaskClasses:
    """One task's label space, tokenized: everything the class side of a forward needs."""

    names: tuple[str, ...]
    offset: int  # index of the first class inside the adapter's union label space
    prompt_layout: PromptLayout | None  # None when the text context is not learned
    template_ids: torch.Tensor  # [C, T] hand-crafted prompts of the zero-shot classifier

    @property
    def num_classes(self) -> int:
        return len(self.names)


def num_context_tokens(config: DPTConfig, tokenizer: PreTrainedTokenizerBase, prompt_format: PromptFormat) -> int:
    """Context length: the init phrase's token count when there is one, else `num_text_tokens`."""
    if config.text_init is not None:
        return len(context_init_ids(tokenizer, prompt_format, config.text_init))
    return config.num_text_tokens


def build_label_space(
    config: DPTConfig, tokenizer: PreTrainedTokenizerBase, prompt_format: PromptFormat, max_length: int
) -> dict[str, TaskClasses]:
    """Every task's tokenized classes, numbered consecutively in the adapter's union label space."""
    pad_to = max_length if config.pad_text_to_context or prompt_format.pad_to_context else None
    num_context = num_context_tokens(config, tokenizer, prompt_format)
    classes, offset = {}, 0
    for task, names in config.tasks.items():
        layout = None
        if config.learn_text_context:
            layout = build_prompt_layout(
                tokenizer,
                prompt_format,
                names,
                num_context,
                config.class_token_position,
                max_length,
                class_offset=offset,
                class_specific=config.class_specific_context,
                pad_to=pad_to,
            )
        template_ids = build_template_ids(
            tokenizer, prompt_format, names, config.zero_shot_template, max_length, pad_to=pad_to
        )
        classes[task] = TaskClasses(tuple(names), offset, layout, template_ids)
        offset += len(names)
    return classes
