"""MVLPT-style transfer (arXiv 2211.11720): start a target adapter from source adapters' shared prompts.

Every class-agnostic tensor (text context, deep visual prompts, CAVPT modules) is averaged over the sources,
parameter by parameter, and copied into the new adapter. Class-specific tensors stay as initialized: a
class-specific context and the CAVPT auxiliary classifier, which belong to the source label spaces.
"""

from __future__ import annotations

import torch
from peft.utils import load_peft_weights

CHECKPOINT_PREFIX = "base_model.model."


def _is_class_specific(key: str, source_config: dict) -> bool:
    if key.endswith(".classifier.weight") and ".dpt_class_aware." in key:
        return True
    return ".dpt_context" in key and bool(source_config.get("class_specific_context"))


def _read_source(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from peft import PeftConfig

    try:
        config = PeftConfig.from_pretrained(path).to_dict()
    except (OSError, ValueError) as err:
        raise ValueError(f"init_from: cannot read an adapter config from {path!r} ({err}); give a DPT adapter "
                         "directory or Hub id.") from err
    peft_type = getattr(config.get("peft_type"), "value", config.get("peft_type"))
    if peft_type != "DPT":
        raise ValueError(f"init_from: {path!r} is a {peft_type} adapter, not a DPT adapter.")
    try:
        weights = load_peft_weights(path, device="cpu")
    except Exception as err:  # safetensors raises its own error type for a truncated or corrupt file
        raise ValueError(f"init_from: cannot read the weights of {path!r} ({err}); the file may be corrupt.") from err
    return config, weights


def shared_source_tensors(paths: list[str]) -> dict[str, torch.Tensor]:
    """Class-agnostic tensors of the sources, averaged; keys as saved (without adapter name)."""
    averaged: dict[str, torch.Tensor] = {}
    for path in paths:
        config, weights = _read_source(path)
        shared = {k.removeprefix(CHECKPOINT_PREFIX): v.float() for k, v in weights.items()
                  if not _is_class_specific(k, config)}
        if averaged and shared.keys() != averaged.keys():
            raise ValueError(f"init_from: {path!r} has other prompt tensors than {paths[0]!r}; sources must share "
                             "one prompt layout to be averaged.")
        for key, value in shared.items():
            if key in averaged and value.shape != averaged[key].shape:
                raise ValueError(f"init_from: {key} is {tuple(value.shape)} in {path!r} but "
                                 f"{tuple(averaged[key].shape)} in {paths[0]!r}.")
            averaged[key] = averaged.get(key, 0) + value / len(paths)
    return averaged


def copy_shared_tensors(tuner, adapter_name: str, sources: dict[str, torch.Tensor]) -> list[str]:
    """Copy averaged source tensors into `adapter_name` (all shapes checked before anything is copied)."""
    targets = {}
    for name, parameter in tuner.named_parameters():
        key = tuner._remove_adapter_name_from_key(name, adapter_name)
        if key != name:  # a parameter of this adapter
            targets[key.removeprefix("model.")] = parameter
    missing = sorted(set(sources) - set(targets))
    if missing:
        raise ValueError(f"init_from: the new adapter has no prompt tensor {missing[0]} of the source; use the same "
                         "prompt settings (num_visual_tokens, visual_depth, class_aware_layer, ...) as the source.")
    for key, value in sources.items():
        if targets[key].shape != value.shape:
            raise ValueError(
                f"init_from: {key} is {tuple(value.shape)} in the source but {tuple(targets[key].shape)} here; the "
                "source was made for another width or prompt length (num_text_tokens, num_visual_tokens)."
            )
    with torch.no_grad():
        for key, value in sources.items():
            targets[key].copy_(value.to(targets[key].device, targets[key].dtype))
    return sorted(sources)
