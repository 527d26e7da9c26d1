"""Checks of a `DPTConfig` that live outside its class: against a base model (before anything is injected), and of
the fields that keep what CLIP knew (`consistency_weights`, `consistency_templates`, `zero_shot_ensemble`), which
`set_zero_shot_ensemble` also applies. Each refusal names the field and the fix."""

from __future__ import annotations

import math
from collections.abc import Sequence

from peft.config import PeftConfig

from .backbones import Backbone
from .utils.errors import UserInputError


def check_config_for_model(config: PeftConfig, backbone: Backbone) -> None:
    """Checks of a `DPTConfig` (it imports this module) that need the base model (its shape, its text tower); raised
    before anything is injected."""
    if config.base_model_family is None and config.vision_hidden_size is not None:  # a saved adapter names its family
        raise UserInputError(
            "adapter_config.json records the base model's shape but not its family (base_model_family), so it "
            f'could be another family\'s adapter of the same shape; add "base_model_family": "{backbone.family}" '
            "if it was trained on this kind of model."
        )
    if config.base_model_family not in (None, backbone.family):
        raise UserInputError(
            f"This adapter was made for a {config.base_model_family} base model (base_model_family in "
            f"adapter_config.json) and cannot load into a {backbone.family} one: prompts are learned for one "
            f"model's embeddings. Load it into the {config.base_model_family} model it was trained on "
            f"({config.base_model_name_or_path or 'see adapter_config.json'}), or train a new adapter for this model."
        )
    actual = backbone.shape
    mismatched = {k: (getattr(config, k), v) for k, v in actual.items() if getattr(config, k) not in (None, v)}
    if mismatched:
        details = ", ".join(f"{k}: adapter {a}, model {m}" for k, (a, m) in mismatched.items())
        raise UserInputError(
            f"This adapter was made for a CLIP of another shape ({details}); load it into the base model it "
            f"was trained on ({config.base_model_name_or_path or 'see adapter_config.json'}). A DPTConfig "
            "records the shape of the first CLIP it is applied to: for another CLIP, create a new DPTConfig."
        )
    if config.text_encoding == "shared_prefix" and not backbone.causal_text:
        raise UserInputError(
            f"text_encoding='shared_prefix' needs a causal text tower, and the {backbone.family} one attends in "
            "both directions (every position sees the class tokens, so nothing is shared); use 'auto' or 'full'."
        )
    num_layers, text_context_length = actual["vision_num_layers"], backbone.text_context_length
    if config.visual_depth is not None and config.visual_depth > num_layers:
        raise UserInputError(
            f"visual_depth={config.visual_depth} exceeds the {num_layers} vision layers of the base model; "
            f"use a value from 1 to {num_layers}, or None."
        )
    if config.class_aware_layer is not None and not 0 <= config.class_aware_layer < num_layers:
        raise UserInputError(
            f"class_aware_layer={config.class_aware_layer} is not a vision layer of the base model; "
            f"use a 0-based index from 0 to {num_layers - 1}, or None for the last layer."
        )
    if config.learn_text_context and config.text_init is None and config.num_text_tokens >= text_context_length - 2:
        raise UserInputError(
            f"num_text_tokens={config.num_text_tokens} leaves no room for a class name in the text encoder's "
            f"context of {text_context_length} tokens; use fewer than {text_context_length - 3}."
        )


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def checked_consistency_weights(value: object) -> tuple[float, float, float] | None:
    """`(image, text, logits)` as three floats (a JSON list or the CLI's three values become a tuple), or None."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        valid = False
    else:
        valid = all(_is_number(v) and v >= 0 for v in value)
    if not valid:
        raise UserInputError(
            f"consistency_weights={value!r} must be three finite numbers >= 0 (image, text, logits), e.g. (10, 25, 1) "
            "as PromptSRC (CLI: --consistency_weights 10 25 1); None turns self-consistency off."
        )
    return tuple(float(v) for v in value)


def checked_consistency_templates(value: object) -> list[str] | None:
    """Templates of the frozen text features the consistency terms aim at, each with one `{}`, or None."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not value or any(not isinstance(t, str) or t.count("{}") != 1 for t in value):
        raise UserInputError(
            f"consistency_templates={value!r} must be a non-empty list of templates, each with exactly one '{{}}' for "
            "the class name (e.g. ['a photo of a {}.', 'a drawing of a {}.']); None uses zero_shot_template alone."
        )
    return list(value)


def checked_zero_shot_ensemble(value: object) -> float | None:
    """The weight of the adapter's probabilities in the zero-shot ensemble, in [0, 1], or None (the adapter alone)."""
    if value is None:
        return None
    if not (_is_number(value) and 0 <= value <= 1):
        raise UserInputError(
            f"zero_shot_ensemble={value!r} is the weight of the adapter's probabilities (the rest is the zero-shot "
            "classifier's): give a number in [0, 1], e.g. 0.5, or None for the adapter alone."
        )
    return float(value)
