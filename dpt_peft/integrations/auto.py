"""One-call loading of a DPT adapter: `AutoDPTModel.from_pretrained(adapter_dir_or_hub_id)`.

PEFT's `AutoPeftModel` refuses configs with a task type, and its task-specific subclasses know only PEFT's own
`PeftModel*` classes; `AutoDPTModel` is the same idea for DPT: it reads the adapter's config, loads the base CLIP it
records (the toy CLIP's id resolves to the shipped copy), then the adapter with `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from huggingface_hub import ResolvedRevision
from peft import AutoPeftModel, PeftConfig
from torch import nn
from transformers import AutoModel, PretrainedConfig

from ..adapter_files import local_weights
from ..backbones import backbone_for
from ..config import DPTConfig
from ..peft_model import DPTPeftModel
from ..sources import recorded_name, resolve

# Where each keyword goes. Hub access applies to the adapter and to the base model; PEFT's loading options to the
# adapter; anything else (dtype, device_map, attn_implementation, quantization_config, ...) to the base CLIP.
HUB_KWARGS = ("token", "cache_dir", "local_files_only", "force_download", "proxies")
ADAPTER_KWARGS = ("subfolder", "autocast_adapter_dtype", "ephemeral_gpu_offload", "torch_device", "key_mapping")
# Passed by transformers' `pipeline()` to every model class it tries; they mean nothing here.
PIPELINE_ONLY_KWARGS = ("_from_pipeline", "code_revision", "_commit_hash")


class AutoDPTModel(AutoPeftModel):
    """Loads base CLIP + DPT adapter in one call; `from_pretrained` returns a [`DPTPeftModel`].

    Example:

        ```py
        >>> from dpt_peft.integrations.auto import AutoDPTModel
        >>> model = AutoDPTModel.from_pretrained("outputs/dpt-toy/adapter", dtype=torch.bfloat16)
        >>> model(pixel_values=pixel_values).logits
        ```
    """

    _target_class = AutoModel
    _target_peft_class = DPTPeftModel

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: DPTConfig | PretrainedConfig | None = None,
        revision: str | None = None,
        base_model_name_or_path: str | None = None,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> DPTPeftModel:
        """Base CLIP and adapter from an adapter directory or Hub repo id, in eval mode (train mode with
        `is_trainable=True`).

        Args:
            pretrained_model_name_or_path: Directory or Hub repo id holding `adapter_config.json` and the weights.
            config: A `DPTConfig` to use instead of the saved one, or the base model's `PretrainedConfig` (as
                transformers' `pipeline()` passes), which goes to `AutoModel.from_pretrained`.
            revision: Revision of the adapter repo; the base model is loaded at the revision the adapter records.
            base_model_name_or_path: Load the adapter onto this CLIP instead of the one the adapter records (e.g. a
                local copy); it must have the same shape.
            low_cpu_mem_usage: Create the adapter's tensors on the meta device and assign the saved ones (PEFT's
                option; the base model is always loaded that way by transformers 5).
            kwargs: `dtype`/`torch_dtype`, `device_map`, `attn_implementation`, ... go to `AutoModel.from_pretrained`;
                `token`, `cache_dir`, `local_files_only`, ... to both loads; `subfolder`, `torch_device`,
                `autocast_adapter_dtype` to the adapter.
        """
        for name in PIPELINE_ONLY_KWARGS:
            kwargs.pop(name, None)
        kwargs.pop("trust_remote_code", None)  # CLIP and DPT run no remote code
        if isinstance(revision, ResolvedRevision):  # resolved by pipeline() against the base repo, not the adapter
            revision = revision.initial
        hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        adapter_options = {k: kwargs.pop(k) for k in ADAPTER_KWARGS if k in kwargs}
        base_config = None
        if isinstance(config, PretrainedConfig):
            config, base_config = None, config
        source = str(pretrained_model_name_or_path)
        local_weights(source, adapter_options.get("subfolder"))  # a local folder is complete before the base loads
        peft_config = config or PeftConfig.from_pretrained(
            source, revision=revision, subfolder=adapter_options.get("subfolder"), **hub
        )
        if not isinstance(peft_config, DPTConfig):
            raise ValueError(
                f"{source!r} holds a {getattr(peft_config.peft_type, 'value', peft_config.peft_type)} adapter, not a "
                "DPT one; load it with peft.AutoPeftModel or PeftModel.from_pretrained."
            )
        if config is None:  # read again as DPT: sizes against the weights' header, init_from dropped, before the base
            peft_config = DPTConfig.from_pretrained(
                source, revision=revision, subfolder=adapter_options.get("subfolder"), **hub
            )
        clip = _load_base_clip(peft_config, base_model_name_or_path, base_config, hub, kwargs)
        if low_cpu_mem_usage and "torch_device" not in adapter_options:
            # Assigned tensors keep the device they were read to: read them where the CLIP is.
            adapter_options["torch_device"] = str(backbone_for(clip).text_parameter.device)
        model = DPTPeftModel.from_pretrained(
            clip,
            source,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            config=peft_config,
            revision=revision,
            low_cpu_mem_usage=low_cpu_mem_usage,
            **adapter_options,
            **hub,
        )
        return model.train() if is_trainable else model.eval()


def _load_base_clip(
    peft_config: DPTConfig,
    override: str | None,
    base_config: PretrainedConfig | None,
    hub: dict[str, Any],
    model_kwargs: dict[str, Any],
) -> nn.Module:
    name = override or peft_config.base_model_name_or_path
    if not name:
        raise ValueError(
            "The adapter records no base model (base_model_name_or_path is empty); pass "
            "base_model_name_or_path= the CLIP it was trained on."
        )
    if "torch_dtype" in model_kwargs:  # transformers 5 calls it dtype
        dtype = model_kwargs.pop("torch_dtype")
        model_kwargs.setdefault("dtype", dtype)
    if isinstance(model_kwargs.get("dtype"), str) and hasattr(torch, model_kwargs["dtype"]):
        model_kwargs["dtype"] = getattr(torch, model_kwargs["dtype"])
    revision = None if override else peft_config.revision  # the recorded revision belongs to the recorded base
    if base_config is not None:
        model_kwargs["config"] = base_config
    try:
        clip = AutoModel.from_pretrained(resolve(name), revision=revision, **hub, **model_kwargs)
    except OSError as err:
        raise OSError(
            f"Could not load the adapter's base CLIP {name!r} ({err}). Pass base_model_name_or_path= a local copy "
            "or another id of the same model."
        ) from err
    clip.name_or_path = recorded_name(clip.name_or_path)  # a saved adapter records the id, not this machine's path
    return clip
