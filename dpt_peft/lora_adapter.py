"""What a LoRA adapter of `--method lora` is made of besides PEFT's own files: the `LoraConfig` of CLIP-LoRA's recipe
on a dual encoder (`clip_lora_config`), and `LoraClassifierConfig`, the classifier it was trained with (class names,
template, logit scale, base model), saved beside the adapter as `classifier_config.json`.

The adapter itself stays a plain PEFT LoRA adapter (`PeftModel.from_pretrained(CLIPModel..., folder)` loads it
without dpt_peft); `classifier_config.json` is what lets `dpt-peft evaluate` and `predict` classify with it.
CLIP-LoRA's values and where they come from: docs/method.md, "LoRA (CLIP-LoRA recipe)".
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData, hf_hub_download
from peft import LoraConfig, PeftConfig
from torch import nn

from .adapter_files import CONFIG_FILE, AdapterFileError, read_config_json, read_local_adapter
from .backbones import Backbone, backbone_for
from .class_names import DEFAULT_TASK, validate_class_names
from .utils.errors import UserInputError
from .utils.write_policy import read_json

CLASSIFIER_CONFIG_FILE = "classifier_config.json"
CLASSIFIER_FORMAT = "dpt_peft-lora-classifier"
MAX_CLASSIFIER_BYTES = 64 * 2**20  # as an adapter config: a million class names is about 20 MB
CLIP_LORA_TEMPLATE = "a photo of a {}."  # CLIP-LoRA's datasets/*.py: the same template for every dataset
CLIP_LORA_LOGIT_SCALE = 100.0  # CLIP-LoRA's main.py: `logit_scale = 100` (CLIP's own, clamped at 100)
# CLIP-LoRA's `--params` letters and the projections they name in transformers' dual encoders.
PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
ENCODERS = ("both", "text", "vision")


@dataclass
class LoraClassifierConfig:
    """The classifier a LoRA adapter was trained with: the text features of `template` for each class, computed by the
    LoRA'd text encoder, scaled by `logit_scale` against the LoRA'd image features; and the base model it adapts
    (family and shape, checked before the weights load)."""

    class_names: list[str]
    template: str = CLIP_LORA_TEMPLATE
    logit_scale: float = CLIP_LORA_LOGIT_SCALE
    method: str = "lora"
    base_model_family: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    vision_hidden_size: int | None = None
    vision_num_layers: int | None = None
    text_hidden_size: int | None = None
    text_num_layers: int | None = None
    projection_dim: int | None = None
    # The PEFT config read beside it (`from_pretrained`); not part of classifier_config.json.
    peft_config: LoraConfig | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.class_names, dict):
            raise UserInputError("class_names: a LoRA classifier has one task; give one list of class names.")
        validate_class_names(self.class_names)
        self.class_names = list(self.class_names)
        if not isinstance(self.template, str) or self.template.count("{}") != 1:
            raise UserInputError(
                f"template={self.template!r} must contain exactly one '{{}}' for the class name, e.g. "
                f"{CLIP_LORA_TEMPLATE!r}."
            )
        scale = self.logit_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise UserInputError(f"logit_scale={scale!r} must be a positive number (CLIP-LoRA: 100).")
        if self.method != "lora":
            raise UserInputError(f"method={self.method!r}: a {CLASSIFIER_CONFIG_FILE} describes a 'lora' adapter.")

    @property
    def tasks(self) -> dict[str, list[str]]:
        """Class names per task, as `DPTConfig.tasks` (one task, `"default"`)."""
        return {DEFAULT_TASK: list(self.class_names)}

    @property
    def zero_shot_template(self) -> str:
        """The template of the classifier, with the adapter on or off (the name DPT's config and reports use)."""
        return self.template

    def recorded_from(self, model: nn.Module) -> LoraClassifierConfig:
        """This config with the family, shape and id of `model` (the base it is applied to) recorded."""
        backbone = backbone_for(model)
        return dataclasses.replace(
            self,
            base_model_family=backbone.family,
            base_model_name_or_path=getattr(model, "name_or_path", None) or None,
            text_num_layers=len(backbone.text_layers),
            **backbone.shape,
        )

    def check_base(self, backbone: Backbone, where: str = "this adapter") -> None:
        """Refuse a base model of another family or shape, naming the recorded field, before any weight loads."""
        if self.base_model_family not in (None, backbone.family):
            raise UserInputError(
                f"{where} was trained on a {self.base_model_family} base model (base_model_family in "
                f"{CLASSIFIER_CONFIG_FILE}), not a {backbone.family} one; load it into "
                f"{self.base_model_name_or_path or 'the model it was trained on'}."
            )
        actual = {**backbone.shape, "text_num_layers": len(backbone.text_layers)}
        for name, value in actual.items():
            if getattr(self, name) not in (None, value):
                raise UserInputError(
                    f"{where} was trained on a base model of another shape ({name}: adapter {getattr(self, name)}, "
                    f"model {value}); load it into {self.base_model_name_or_path or 'the model it was trained on'}."
                )

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "peft_config"}
        return {"format": CLASSIFIER_FORMAT, **values}

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str) -> LoraClassifierConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"peft_config"}
        if values.get("format") != CLASSIFIER_FORMAT:
            raise AdapterFileError(f"{where} is not a {CLASSIFIER_FORMAT} file; save the adapter again.")
        unknown = sorted(set(values) - names - {"format"})
        if unknown or "class_names" not in values:
            raise AdapterFileError(
                f"{where} has {'unknown fields ' + str(unknown) if unknown else 'no class_names'}; it was written by "
                "another version of dpt_peft or edited: save the adapter again."
            )
        return cls(**{key: value for key, value in values.items() if key in names})

    @classmethod
    def from_pretrained(
        cls, adapter: str | os.PathLike, subfolder: str | None = None, revision: str | None = None, **hub: Any
    ) -> LoraClassifierConfig | None:
        """The classifier of the LoRA adapter in `adapter` (a folder or a Hub id), with its `LoraConfig` as
        `peft_config`; None when `adapter` holds another kind of adapter (its own loader says what is wrong with it).
        A local folder is checked before anything is built: complete, safetensors only, the rank of every LoRA matrix
        in the weights' header equal to the config's `r`."""
        local = None
        try:
            local = read_local_adapter(adapter, subfolder)
        except AdapterFileError:
            if not Path(adapter, subfolder or "", CONFIG_FILE).is_file():
                return None  # a folder with no adapter config: the DPT loader names what is missing
            raw = read_config_json(Path(adapter, subfolder or "", CONFIG_FILE))
            if raw.get("peft_type") != "LORA":
                return None
            raise
        if local is None:  # a Hub id: PEFT reads its config (and later downloads the weights), then the classifier's
            try:
                lora = PeftConfig.from_pretrained(str(adapter), subfolder=subfolder, revision=revision, **hub)
            except (ValueError, TypeError):
                return None  # not an adapter PEFT can read: the DPT loader names the problem
            if not isinstance(lora, LoraConfig):
                return None
            classifier_path = Path(
                hf_hub_download(str(adapter), CLASSIFIER_CONFIG_FILE, subfolder=subfolder, revision=revision, **hub)
            )
            folder, shapes = str(adapter), None
        else:
            raw, folder, shapes = local.raw_config, local.folder, local.shapes
            if raw.get("peft_type") != "LORA":
                return None
            saved = {key: value for key, value in raw.items() if key != "runtime_config"}  # as PEFT, which ignores it
            try:
                lora = LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**saved))
            except (TypeError, ValueError) as err:
                raise AdapterFileError(f"Could not use the LoRA adapter in {str(folder)!r}: {err}") from err
            classifier_path = folder / CLASSIFIER_CONFIG_FILE
            if not classifier_path.is_file():
                raise AdapterFileError(
                    f"{str(folder)!r} holds a LoRA adapter without {CLASSIFIER_CONFIG_FILE} (the class names and "
                    "template it classifies with), so dpt_peft cannot classify with it: load it with "
                    "peft.PeftModel.from_pretrained, or save it with dpt_peft's LoraClassifier."
                )
        fix = "save or download the adapter again."
        values = read_json(classifier_path, "the LoRA adapter's classifier", fix, True, MAX_CLASSIFIER_BYTES)
        config = cls.from_dict(values, str(classifier_path))
        config.peft_config = lora
        if shapes is not None:
            check_ranks(lora, shapes, str(folder))
        return config


def check_ranks(config: LoraConfig, shapes: dict[str, list[int]], where: str) -> None:
    """Every LoRA matrix in the weights' header has the config's rank (a hostile `r` never allocates)."""
    if config.rank_pattern:
        return  # per-module ranks: PEFT compares them with the weights when it loads them
    for key, shape in shapes.items():
        if key.endswith("lora_A.weight") and shape[0] != config.r:
            raise AdapterFileError(
                f"The adapter in {where!r} does not match its config: {key} has rank {shape[0]}, adapter_config.json "
                f"says r={config.r}; save or download the adapter again."
            )


def clip_lora_config(
    model: nn.Module,
    *,
    r: int = 2,
    alpha: float = 1.0,
    dropout: float = 0.25,
    encoder: str = "both",
    layers: str = "all",
    targets: tuple[str, ...] = ("q", "k", "v"),
) -> LoraConfig:
    """PEFT's `LoraConfig` of CLIP-LoRA's `apply_lora` on `model` (a CLIP or SigLIP): rank `r` matrices on the
    `targets` projections (`PROJECTIONS`) of the attention of `layers` ("all", or 0-based indices "8,9,10,11") of the
    `encoder` towers; dropout on the input of each LoRA branch; scaling alpha / sqrt(r) (`use_rslora`, as CLIP-LoRA's
    `LoRALayer`); A Kaiming-uniform and B zero at the start (PEFT's default, as CLIP-LoRA's `init_lora_param`)."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise UserInputError(
            f"lora_r={r!r} is the rank of the LoRA matrices: give an integer of at least 1 (CLIP-LoRA: 2)."
        )
    if not math.isfinite(alpha) or alpha <= 0:
        raise UserInputError(f"lora_alpha={alpha!r} must be a positive number (CLIP-LoRA: 1).")
    if not 0 <= dropout < 1:
        raise UserInputError(f"lora_dropout={dropout!r} is a probability: use a value in [0, 1) (CLIP-LoRA: 0.25).")
    if encoder not in ENCODERS:
        raise UserInputError(f"lora_encoder={encoder!r}: choose one of {list(ENCODERS)} (CLIP-LoRA: both).")
    unknown = [t for t in targets if t not in PROJECTIONS]
    if unknown or not targets:
        raise UserInputError(
            f"lora_targets={','.join(targets)!r}: name attention projections among {sorted(PROJECTIONS)} (CLIP-LoRA: "
            "q,k,v)."
        )
    backbone = backbone_for(model)
    names = {module: name for name, module in model.named_modules()}
    towers = {
        "text": [names[layer] for layer in backbone.text_layers],
        "vision": [backbone.vision_layer_key(i) for i in range(backbone.num_vision_layers)],
    }
    chosen = [tower for tower in towers if encoder in (tower, "both")]
    modules = []
    for tower in chosen:
        for index in layer_indices(layers, len(towers[tower]), tower):
            modules += [f"{towers[tower][index]}.self_attn.{PROJECTIONS[t]}" for t in dict.fromkeys(targets)]
    missing = [name for name in modules if name not in set(names.values())]
    if missing:
        raise UserInputError(f"lora_targets: {missing[0]} is not a module of this {backbone.display_name}.")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_rslora=True,
        target_modules=modules,
        bias="none",
    )


def layer_indices(layers: str, num_layers: int, tower: str) -> list[int]:
    """`"all"` or comma-separated 0-based indices, each checked against the tower's depth."""
    if layers.strip() == "all":
        return list(range(num_layers))
    try:
        indices = sorted({int(part) for part in layers.split(",") if part.strip()})
    except ValueError:
        indices = []
    if not indices or not all(0 <= i < num_layers for i in indices):
        raise UserInputError(
            f"lora_layers={layers!r}: give 'all' or 0-based layer indices such as '8,9,10,11', each below the "
            f"{num_layers} layers of the {tower} tower."
        )
    return indices


def lora_model_card(classifier: LoraClassifierConfig, info: Any) -> ModelCard:
    """The card of a saved LoRA adapter: what it is, its classes and results, and how to load it (PEFT's own card
    would be a template with placeholders). `info`: what the training run knows (`model_card.ModelCardInfo`)."""
    base = (info and info.base_model_id) or classifier.base_model_name_or_path
    accuracy = (info.metrics if info else {}).get("accuracy")
    data = ModelCardData(
        library_name="peft",
        base_model=base if base and not os.path.isabs(base) else None,
        license=info.license if info else None,
        pipeline_tag="image-classification",
        tags=["lora", "clip-lora", classifier.base_model_family or "clip", "peft", "image-classification"],
    )
    names = classifier.class_names
    lines = [
        f"# LoRA adapter of {base or 'a CLIP model'} (CLIP-LoRA recipe)",
        "",
        "Trained with `dpt-peft train --method lora`: LoRA on the attention projections of the encoders, classified "
        "by the text features of one template per class (CLIP-LoRA, Zanella and Ben Ayed, CVPRW 2024).",
        "",
        f"- classes ({len(names)}): {', '.join(names[:20])}{', ...' if len(names) > 20 else ''}",
        f"- template: `{classifier.template}`, logit scale {classifier.logit_scale:g}",
        *([f"- training data: {info.dataset}, {info.shots} shots per class"] if info and info.dataset else []),
        *([f"- test accuracy: {100 * accuracy:.1f}%"] if isinstance(accuracy, (int, float)) else []),
        "",
        "Load it with PEFT alone (`PeftModel.from_pretrained(base_model, folder)`; the class names are in "
        f"`{CLASSIFIER_CONFIG_FILE}`), or classify with dpt_peft: `AutoDPTModel.from_pretrained(folder)`, "
        "`dpt-peft predict --adapter folder IMAGES`.",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
