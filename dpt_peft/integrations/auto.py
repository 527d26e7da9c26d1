"""One-call loading of a DPT adapter: `AutoDPTModel.from_pretrained(adapter_dir_or_hub_id)`.

PEFT's `AutoPeftModel` refuses configs with a task type, and its task-specific subclasses know only PEFT's own
`PeftModel*` classes; `AutoDPTModel` is the same idea for DPT. It is the PEFT-style face of the core's one loader,
`sources.load_adapter_and_base` (the adapter checked once, then the base model it records, then the adapter); what it
adds is what transformers' `pipeline()` passes to every model class it tries.
"""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import ResolvedRevision
from peft import AutoPeftModel
from transformers import AutoModel, PretrainedConfig

from ..config import DPTConfig
from ..peft_model import DPTPeftModel
from ..sources import load_adapter_and_base

# Passed by transformers' `pipeline()` to every model class it tries; they mean nothing here.
PIPELINE_ONLY_KWARGS = ("_from_pipeline", "code_revision", "_commit_hash", "trust_remote_code")


class AutoDPTModel(AutoPeftModel):
    """Loads base model + DPT adapter in one call; `from_pretrained` returns a [`DPTPeftModel`].

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
        """Base model and adapter from an adapter directory or Hub repo id, in eval mode (train mode with
        `is_trainable=True`).

        Args:
            pretrained_model_name_or_path: Directory or Hub repo id holding `adapter_config.json` and the weights.
            config: A `DPTConfig` to use instead of the saved one, or the base model's `PretrainedConfig` (as
                transformers' `pipeline()` passes), which goes to `AutoModel.from_pretrained`.
            revision: Revision of the adapter repo; the base model is loaded at the revision the adapter records.
            base_model_name_or_path: Load the adapter onto this base model instead of the one the adapter records
                (e.g. a local copy); it must have the same shape.
            low_cpu_mem_usage: Create the adapter's tensors on the meta device and assign the saved ones (PEFT's
                option; the base model is always loaded that way by transformers 5).
            kwargs: `dtype`/`torch_dtype`, `device_map`, `attn_implementation`, ... go to `AutoModel.from_pretrained`;
                `token`, `cache_dir`, `local_files_only`, ... to both loads; `subfolder`, `torch_device`,
                `autocast_adapter_dtype` to the adapter (`sources.load_adapter_and_base`).
        """
        for name in PIPELINE_ONLY_KWARGS:  # CLIP, SigLIP and DPT run no remote code
            kwargs.pop(name, None)
        if isinstance(revision, ResolvedRevision):  # resolved by pipeline() against the base repo, not the adapter
            revision = revision.initial
        base_config = config if isinstance(config, PretrainedConfig) else None
        return load_adapter_and_base(
            pretrained_model_name_or_path,
            base_model_name_or_path,
            config=None if base_config is not None else config,
            base_config=base_config,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            revision=revision,
            low_cpu_mem_usage=low_cpu_mem_usage,
            **kwargs,
        )
