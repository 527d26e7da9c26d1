"""Where base models come from: the one resolver of model ids, the one base-model loader and the one base + adapter
loader.

Models that ship inside the package (the toy CLIP of the embedded default, the toy SigLIP) have a Hub-style id.
`resolve` maps the id to the shipped folder when loading; `recorded_name` maps that folder back to the id when an
adapter records its base model, so no saved adapter holds a path of this machine. Nothing here trains a model: a
missing shipped copy is an error that says how to rebuild it.

`load_adapter_and_base` is the loader behind both faces, `AutoDPTModel.from_pretrained` (PEFT's, in integrations/)
and `load_adapted_model` (the tools'): it lives here so that training/ (evaluation) reaches it without importing a
layer above its own.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .backbones import BACKBONES, backbone_for
from .config import DPTConfig
from .lora_adapter import LoraClassifierConfig
from .lora_classifier import LoraClassifier
from .utils.errors import MissingInputError, UserInputError

TOY_CLIP_ID = "dpt-peft/toy-clip"
TOY_SIGLIP_ID = "dpt-peft/toy-siglip"
_TOY = Path(__file__).resolve().parent / "toy"
logger = logging.getLogger(__name__)
SHIPPED_MODELS = {TOY_CLIP_ID: _TOY / "assets", TOY_SIGLIP_ID: _TOY / "siglip_assets"}
# The DPTConfig values a shipped model needs where DPTConfig's defaults cannot fit it: the toy models' text context has
# 16 positions, too few for 16 context tokens plus a class name. `fit_to_shipped_model` applies them to a new adapter
# whose field is left at its default, in Python as on the command line.
SHIPPED_MODEL_FITS = {TOY_CLIP_ID: {"num_text_tokens": 4}, TOY_SIGLIP_ID: {"num_text_tokens": 4}}
REBUILT_BY = {TOY_CLIP_ID: "dpt_peft.toy.pretrain", TOY_SIGLIP_ID: "dpt_peft.toy.siglip"}  # `python -m` modules

# Where each keyword of the base + adapter loader goes. Hub access applies to the adapter and to the base model;
# PEFT's loading options to the adapter; anything else (dtype, device_map, attn_implementation, ...) to the base.
HUB_KWARGS = ("token", "cache_dir", "local_files_only", "force_download", "proxies")
ADAPTER_KWARGS = ("subfolder", "autocast_adapter_dtype", "ephemeral_gpu_offload", "torch_device", "key_mapping")
# How each face of the loader names the base model, for refusals that ask for it.
BASE_MODEL_ARGUMENTS = "--model_name_or_path, model_name_or_path= or AutoDPTModel's base_model_name_or_path="


def is_shipped(name_or_path: str | None) -> bool:
    return name_or_path in SHIPPED_MODELS


def resolve(name_or_path: str) -> str:
    """A source `from_pretrained` can load: a shipped model's id becomes its folder, anything else is returned as is."""
    folder = SHIPPED_MODELS.get(name_or_path)
    if folder is None:
        return name_or_path
    if not (folder / "model.safetensors").is_file():
        raise MissingInputError(
            f"{name_or_path} ships with dpt_peft, but {folder} holds no model.safetensors (an install without "
            "package data?). Reinstall dpt-peft, or rebuild the weights (a few minutes on 2 CPU cores) with "
            f"`python -m {REBUILT_BY[name_or_path]} --output_dir {folder}`."
        )
    return str(folder)


def recorded_name(name_or_path: str | None) -> str | None:
    """What an adapter records as its base model: a shipped model's id instead of the folder it was loaded from."""
    if name_or_path:
        for model_id, folder in SHIPPED_MODELS.items():
            if os.path.isdir(name_or_path) and Path(name_or_path).resolve() == folder:
                return model_id
    return name_or_path


def fit_to_shipped_model(config: DPTConfig, model_name_or_path: str | None) -> None:
    """On a shipped model: refuse an adapter recorded for the other shipped model (the toy CLIP and toy SigLIP have
    one shape, so only their names tell their adapters apart when a config's family is wrong), and apply
    `SHIPPED_MODEL_FITS` to the fields `config` leaves at DPTConfig's defaults (a saved adapter never holds such a
    default: it could not have been made on that model)."""
    base = recorded_name(model_name_or_path) or ""
    recorded = config.base_model_name_or_path
    if base in SHIPPED_MODELS and recorded in SHIPPED_MODELS and recorded != base:
        raise UserInputError(
            f"This adapter was made for the shipped {recorded} (base_model_name_or_path in adapter_config.json), not "
            f"for {base}: load it into {recorded}, e.g. AutoDPTModel.from_pretrained(adapter)."
        )
    defaults = {f.name: f.default for f in dataclasses.fields(DPTConfig)}
    for name, value in SHIPPED_MODEL_FITS.get(base, {}).items():
        if getattr(config, name) == defaults[name]:
            logger.info(
                "%s=%s on the shipped %s (the default %s does not fit it)",
                name,
                value,
                model_name_or_path,
                defaults[name],
            )
            setattr(config, name, value)


def load_base_model(
    model_name_or_path: str | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """A base model DPT can adapt (a family with a backbone; any other is refused here), as `AutoModel` loads it.

    Without a name, the toy CLIP of the embedded default. A shipped model keeps its id as `name_or_path`, so that
    adapters trained on it record no path of this machine. `dtype` (or transformers 4's `torch_dtype`) may be a
    `torch.dtype`, its name (`"bfloat16"`) or `"auto"`; `kwargs` go to `from_pretrained` (`device_map`, `config`,
    `token`, ...).
    """
    torch_dtype = kwargs.pop("torch_dtype", None)
    dtype = torch_dtype if dtype is None else dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        dtype = getattr(torch, dtype)
    options = {"dtype": dtype, "revision": revision, "attn_implementation": attn_implementation}
    model = AutoModel.from_pretrained(
        resolve(model_name_or_path or TOY_CLIP_ID),
        **{name: value for name, value in options.items() if value is not None},
        **kwargs,
    )
    backbone_for(model)
    model.name_or_path = recorded_name(model.name_or_path)
    return model


def load_image_processor(model_name_or_path: str | None = None, *, revision: str | None = None, **hub: Any) -> Any:
    """The base model's image processor (the toy CLIP's without a name); `hub`: `token`, `cache_dir`, ..."""
    if revision is not None:
        hub["revision"] = revision
    return AutoImageProcessor.from_pretrained(resolve(model_name_or_path or TOY_CLIP_ID), **hub)


def load_tokenizer(
    model_name_or_path: str | None = None, *, revision: str | None = None, **hub: Any
) -> PreTrainedTokenizerBase:
    """The base model's tokenizer (the toy CLIP's without a name); `hub`: `token`, `cache_dir`, ..."""
    if revision is not None:
        hub["revision"] = revision
    return AutoTokenizer.from_pretrained(resolve(model_name_or_path or TOY_CLIP_ID), **hub)


def read_adapter_config(
    adapter: str | os.PathLike, subfolder: str | None = None, revision: str | None = None, **hub: Any
) -> DPTConfig | LoraClassifierConfig:
    """A saved adapter's config, checked once before anything is built: a LoRA adapter of `--method lora` (its
    `peft_type` in adapter_config.json) as its `LoraClassifierConfig`, any other as `DPTConfig.from_pretrained`
    reads and checks it."""
    lora = LoraClassifierConfig.from_pretrained(adapter, subfolder, revision, **hub)
    if lora is not None:
        return lora
    return DPTConfig.from_pretrained(str(adapter), subfolder=subfolder, revision=revision, as_adapter=True, **hub)


def load_adapter_and_base(
    adapter: str | os.PathLike,
    model_name_or_path: str | None = None,
    *,
    config: DPTConfig | LoraClassifierConfig | None = None,
    base_config: PretrainedConfig | None = None,
    adapter_name: str = "default",
    is_trainable: bool = False,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
    **kwargs: Any,
) -> PeftModel:
    """Base model and adapter from the adapter's folder or Hub repo id, in eval mode (train mode with
    `is_trainable`): a `DPTPeftModel`, or a `LoraClassifier` for a LoRA adapter of `--method lora`.

    The adapter is checked once, before the base model loads (`read_adapter_config`: the folder complete, every size
    against the weights' header), and that config is what PEFT loads the weights with; a LoRA adapter's recorded
    family and shape are checked against the base model before its weights load.

    Args:
        adapter: Folder or Hub repo id holding `adapter_config.json` and the weights.
        model_name_or_path: Load the adapter onto this copy of its base model instead of the one it records (e.g. a
            local folder); it must have the same shape.
        config: The adapter's config when the caller already holds it (`read_adapter_config(adapter)`, e.g. a
            command that checked the adapter before loading its data): the adapter is not read again.
        base_config: The base model's `PretrainedConfig` (as transformers' `pipeline()` passes it).
        revision: Revision of the adapter repo; the base model is loaded at the revision the adapter records.
        low_cpu_mem_usage: Create the adapter's tensors on the meta device and assign the saved ones (PEFT's option;
            transformers 5 always loads the base model that way).
        kwargs: `HUB_KWARGS` go to both loads, `ADAPTER_KWARGS` to PEFT's, the rest (`dtype`/`torch_dtype`,
            `device_map`, `attn_implementation`, ...) to `load_base_model`.
    """
    hub = {name: kwargs.pop(name) for name in HUB_KWARGS if name in kwargs}
    adapter_options = {name: kwargs.pop(name) for name in ADAPTER_KWARGS if name in kwargs}
    source = str(adapter)
    if config is None:
        subfolder = adapter_options.get("subfolder")
        config = read_adapter_config(source, subfolder, revision, **hub)
    name, base_revision = _base_model_source(config, model_name_or_path, source)
    if base_config is not None:
        kwargs["config"] = base_config
    try:
        base = load_base_model(name, revision=base_revision, **hub, **kwargs)
    except (OSError, ValueError) as err:  # transformers: OSError when missing, ValueError for a folder of no model
        family = next((b.display_name for b in BACKBONES if b.family == config.base_model_family), "model")
        named_by = "" if model_name_or_path else " (base_model_name_or_path in the adapter's adapter_config.json)"
        raise MissingInputError(
            f"Could not load the adapter's base {family} {name!r}{named_by}: {err} Pass a local copy or another id "
            f"of the same model ({BASE_MODEL_ARGUMENTS})."
        ) from err
    if low_cpu_mem_usage and "torch_device" not in adapter_options:
        # Assigned tensors keep the device they were read to: read them where the base model is.
        adapter_options["torch_device"] = str(backbone_for(base).text_parameter.device)
    if isinstance(config, LoraClassifierConfig):  # a plain PEFT LoRA adapter and the classifier recorded beside it
        loader = LoraClassifier.from_pretrained
        adapter_options.update(classifier=config, tokenizer=load_tokenizer(name, revision=base_revision, **hub))
    else:
        loader = PeftModel.from_pretrained  # DPTPeftModel, through DPT's task type
        adapter_options["config"] = config
    model = loader(
        base,
        source,
        adapter_name=adapter_name,
        is_trainable=is_trainable,
        revision=revision,
        low_cpu_mem_usage=low_cpu_mem_usage,
        **adapter_options,
        **hub,
    )
    return model.train() if is_trainable else model.eval()


def load_adapted_model(
    adapter: str | os.PathLike,
    model_name_or_path: str | None = None,
    class_names: list[str] | None = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> tuple[PeftModel, Any]:
    """`load_adapter_and_base` for the tools: the model in eval mode on `device` (default: CUDA when there is one),
    optionally with a new label space, and its base model's image processor."""
    model = load_adapter_and_base(adapter, model_name_or_path, **kwargs)
    if class_names:
        model.set_class_names(class_names)
    name, revision = _base_model_source(model.peft_config[model.active_adapter], model_name_or_path, str(adapter))
    processor = load_image_processor(name, revision=revision, **{k: v for k, v in kwargs.items() if k in HUB_KWARGS})
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")), processor


def _base_model_source(config: Any, model_name_or_path: str | None, adapter: str) -> tuple[str, str | None]:
    """The base model to load an adapter onto, and its revision: the one the adapter records, unless the caller
    names another copy (then the recorded revision, which belongs to the recorded model, does not apply)."""
    if model_name_or_path:
        return model_name_or_path, None
    if not config.base_model_name_or_path:
        raise UserInputError(
            f"The adapter in {adapter!r} records no base model (base_model_name_or_path is empty); pass the model it "
            f"was trained on ({BASE_MODEL_ARGUMENTS})."
        )
    return config.base_model_name_or_path, config.revision
