"""MVLPT-style transfer (arXiv 2211.11720): start a target adapter from source adapters' shared prompts.

Every class-agnostic tensor (text context, deep visual prompts, CAVPT modules) is averaged over the sources,
parameter by parameter, and copied into the new adapter. Class-specific tensors stay as initialized: a
class-specific context and the CAVPT auxiliary classifier, which belong to the source label spaces
(`layer.is_class_specific` decides, from the layer attribute a tensor lives in).
"""

from __future__ import annotations

import torch
from peft import PeftConfig
from peft.utils import load_peft_weights
from torch import nn

from .layer import ParameterKind, is_class_specific
from .peft_types import PEFT_TYPE_NAME
from .utils.errors import UserInputError

CHECKPOINT_PREFIX = "base_model.model."


def _read_source(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        config = PeftConfig.from_pretrained(path).to_dict()
    except (OSError, ValueError) as err:
        raise UserInputError(
            f"init_from: cannot read an adapter config from {path!r} ({err}); give a DPT adapter directory or Hub id."
        ) from err
    peft_type = getattr(config.get("peft_type"), "value", config.get("peft_type"))
    if peft_type != PEFT_TYPE_NAME:
        raise UserInputError(f"init_from: {path!r} is a {peft_type} adapter, not a DPT adapter.")
    try:
        weights = load_peft_weights(path, device="cpu")
    except Exception as err:  # safetensors raises its own error type for a truncated or corrupt file
        raise UserInputError(
            f"init_from: cannot read the weights of {path!r} ({err}); the file may be corrupt."
        ) from err
    return config, weights


def shared_source_tensors(paths: list[str]) -> dict[str, torch.Tensor]:
    """Class-agnostic tensors of the sources, averaged; keys as saved (without adapter name)."""
    averaged: dict[str, torch.Tensor] = {}
    for path in paths:
        config, weights = _read_source(path)
        class_specific_context = bool(config.get("class_specific_context"))
        shared = {
            k.removeprefix(CHECKPOINT_PREFIX): v.float()
            for k, v in weights.items()
            if not is_class_specific(k, class_specific_context)
        }
        if averaged and shared.keys() != averaged.keys():
            raise UserInputError(
                f"init_from: {path!r} has other prompt tensors than {paths[0]!r}; sources must share one prompt "
                "layout to be averaged."
            )
        for key, value in shared.items():
            if key in averaged and value.shape != averaged[key].shape:
                raise UserInputError(
                    f"init_from: {key} is {tuple(value.shape)} in {path!r} but {tuple(averaged[key].shape)} in "
                    f"{paths[0]!r}."
                )
            averaged[key] = averaged.get(key, 0) + value / len(paths)
    return averaged


def copy_shared_tensors(
    targets: dict[str, tuple[ParameterKind, nn.Parameter]], sources: dict[str, torch.Tensor]
) -> list[str]:
    """Copy averaged source tensors into the new adapter's parameters (`DPTModel.adapter_parameters`), all
    shapes checked before anything is copied."""
    missing = sorted(set(sources) - set(targets))
    if missing:
        raise UserInputError(
            f"init_from: the new adapter has no prompt tensor {missing[0]} of the source; use the same prompt "
            "settings (num_visual_tokens, visual_depth, class_aware_layer, ...) as the source."
        )
    for key, value in sources.items():
        parameter = targets[key][1]
        if parameter.shape != value.shape:
            raise UserInputError(
                f"init_from: {key} is {tuple(value.shape)} in the source but {tuple(parameter.shape)} here; the "
                "source was made for another width or prompt length (num_text_tokens, num_visual_tokens)."
            )
    with torch.no_grad():
        for key, value in sources.items():
            parameter = targets[key][1]
            parameter.copy_(value.to(parameter.device, parameter.dtype))
    return sorted(sources)
