"""Configuration of Dual-modality Prompt Tuning (DPT) adapters."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from peft.config import PeftConfig
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from .adapter_files import AdapterFileError, check_config_matches_weights, read_config_json, read_local_adapter
from .backbones import Backbone
from .class_names import DEFAULT_TASK, ClassNames, validate_class_names
from .config_checks import (
    check_config_for_model,
    checked_consistency_templates,
    checked_consistency_weights,
    checked_zero_shot_ensemble,
)
from .peft_types import DPT_PEFT_TYPE, DPT_TASK_TYPE
from .utils.errors import UserInputError

# Recorded from the base model when an adapter is created (checked on load); never set by users.
BASE_SHAPE_FIELDS = ("vision_hidden_size", "vision_num_layers", "text_hidden_size", "projection_dim")
RECORDED_FIELDS = (*BASE_SHAPE_FIELDS, "base_model_family", "initialized_from")
INTEGER_FIELDS = (
    "num_text_tokens",
    "num_visual_tokens",
    "visual_depth",
    "class_aware_layer",
    "class_aware_top_k",
    "class_aware_num_kv_tokens",
    "class_aware_attention_dim",
)
FLOAT_FIELDS = ("class_aware_loss_weight", "prompt_init_std")
TEXT_FIELDS = ("zero_shot_template", "class_token_position", "text_encoding", "visual_prompt_init", "text_init")
# No model has this many layers or channels: a hostile layer count (10^12) is refused before a range is built over it
# (prompt counts are compared with the weights' header instead, `adapter_files.py`, which names the tensor).
MAX_SIZE = 1 << 16
RANGE_FIELDS = ("visual_depth", "class_aware_layer", *BASE_SHAPE_FIELDS)
BOOLEAN_FIELDS = (
    "learn_text_context",
    "class_specific_context",
    "class_aware",
    "pad_text_to_context",
    "cache_class_features",
)
METHOD_PRESETS: dict[str, dict[str, object]] = {
    # The four rows of the paper's ablation table, as configurations of one class.
    "coop": {"learn_text_context": True, "num_visual_tokens": 0, "class_aware": False},
    "vpt": {"learn_text_context": False, "num_visual_tokens": 10, "class_aware": False},
    "vpt_coop": {"learn_text_context": True, "num_visual_tokens": 10, "class_aware": False},
    "dpt": {"learn_text_context": True, "num_visual_tokens": 10, "class_aware": True},
}


def _saved_fields(raw_config: dict) -> dict:
    """The fields of a saved config as PEFT reads them: without the `runtime_config` that PEFT ignores too."""
    return {key: value for key, value in raw_config.items() if key != "runtime_config"}


@dataclass
class DPTConfig(PeftConfig):
    """
    Configuration of a [`DPTModel`]: prompts that adapt a frozen `transformers.CLIPModel` to classification.

    Papers: DPT, Dual-modality Prompt Tuning (https://arxiv.org/abs/2208.08340), built on CoOp
    (https://arxiv.org/abs/2109.01134) and VPT (https://arxiv.org/abs/2203.12119). Every mechanism can be
    switched off alone, so CoOp, VPT, VPT+CoOp and DPT are all configurations of this class
    (see [`DPTConfig.for_method`]).

    Args:
        class_names (`list[str]` or `dict[str, list[str]]`):
            The label space: one list of class names, or one list per task for a multitask adapter. Saved with
            the adapter, because the classifier is rebuilt from them.
        learn_text_context (`bool`, defaults to `True`):
            Learn the CoOp text context. When `False`, classes are encoded with `zero_shot_template`.
        num_text_tokens (`int`, defaults to `16`):
            Number of learnable context vectors. Ignored when `text_init` is given (its token count is used).
        text_init (`str`, *optional*):
            Phrase whose token embeddings initialize the context, e.g. `"a photo of a"`; `None`: N(0, prompt_init_std).
        class_token_position (`"end"`, `"middle"` or `"front"`, defaults to `"end"`):
            Where the class name sits relative to the context.
        class_specific_context (`bool`, defaults to `False`):
            One context per class instead of one shared context.
        num_visual_tokens (`int`, defaults to `10`):
            VPT-deep prompts per vision layer; `0` disables them.
        visual_depth (`int`, *optional*):
            Number of vision layers (from the first) that get deep prompts. `None`: every layer before the first
            class-aware layer, or every layer when class-aware prompts are off.
        class_aware (`bool`, defaults to `True`):
            Class-aware visual prompts (CAVPT): cross-attention from the text features of each image's top-K
            zero-shot classes to its tokens.
        class_aware_layer (`int`, *optional*):
            First (0-based) vision layer with class-aware prompts, and all later ones; `None`: the last (reference).
        class_aware_top_k (`int`, defaults to `10`):
            Number of classes (hence class-aware prompts) per image; capped at the number of classes.
        class_aware_num_kv_tokens (`int`, defaults to `10`):
            Learnable key/value tokens appended to the image tokens in each class-aware attention.
        class_aware_attention_dim (`int`, defaults to `32`):
            Width of the single-head query/key projections of the class-aware attention.
        class_aware_loss_weight (`float`, defaults to `0.3`):
            Weight of the auxiliary class-aware loss (0.3 in the authors' run script).
        zero_shot_template (`str`, defaults to `"a photo of a {}."`):
            Hand-crafted prompt of the frozen zero-shot classifier (top-K classes, guidance loss).
        prompt_init_std (`float`, defaults to `0.02`):
            Std of the normal initialization of random prompts.
        tokenizer_name_or_path (`str`, *optional*):
            CLIP tokenizer to use; `None`: the base model's `name_or_path`.
        visual_prompt_init (`"random"` or `"prototype"`, defaults to `"random"`):
            `"prototype"` marks deep visual prompts to be set from the downstream data's tokens before training
            (SPT, https://arxiv.org/abs/2402.02382); `examples/train.py` runs
            `init_visual_prompts_from_prototypes` on the few-shot training set.
        init_from (`list[str]`, *optional*):
            Source adapters (paths or Hub ids) whose class-agnostic prompts, averaged, initialize this adapter
            (MVLPT transfer, https://arxiv.org/abs/2211.11720). Class-specific tensors are not copied. Applied once,
            when the adapter is created; then recorded as `initialized_from`.
        pad_text_to_context (`bool`, defaults to `False`):
            Pad class prompts to the text encoder's full context, as the reference does. The default cuts them
            after the longest prompt's end token, which gives the same features (causal attention) faster.
        cache_class_features (`bool`, defaults to `True`):
            Reuse class features between calls when no gradient is needed, until the prompts or class names
            change. `False` recomputes them every call, as the reference does.
        text_encoding (`"auto"`, `"shared_prefix"` or `"full"`, defaults to `"auto"`):
            How class prompts go through the text encoder. Their leading tokens (SOT and a shared context, or its
            first half for `"middle"`) are the same for every class, and causal attention makes their hidden states
            the same too: `"shared_prefix"` computes them once and lets each class's own tokens attend to them
            (exact; much cheaper with many classes). `"auto"` uses it whenever there is such a prefix; `"full"`
            encodes every prompt whole (reference). The shared path ignores text-layer hooks and checkpointing.
        consistency_weights (`tuple[float, float, float]`, *optional*):
            Self-consistency regularization of PromptSRC (https://arxiv.org/abs/2307.06948): weights of the L1 term
            between prompted and frozen image features, of the L1 term between learned and frozen class features, and
            of the KL term between zero-shot and prompted logits, added to the training loss (PromptSRC: 10, 25, 1).
            `None` or zeros: off, and the loss is exactly DPT's. See docs/method.md, "Keeping what CLIP knew".
        consistency_templates (`list[str]`, *optional*):
            Templates whose frozen class features, averaged, the text and logit terms aim at (PromptSRC averages 60
            ImageNet templates: `dpt_peft.consistency.PROMPTSRC_TEMPLATES`); `None`: `zero_shot_template` alone.
        zero_shot_ensemble (`float`, *optional*):
            At inference (eval mode), mix the adapter's class probabilities with this weight and the frozen zero-shot
            classifier's with the rest; `logits` become the log of the mixture. `None`: the adapter alone.
        initialized_from (`list[str]`, *optional*):
            Recorded when `init_from` is applied at creation (which then becomes `None`), so that loading the saved
            adapter never reads the sources again. Leave it unset.
        vision_hidden_size, vision_num_layers, text_hidden_size, projection_dim (`int`, *optional*):
            Recorded from the base model when the adapter is created; loading into a CLIP with other values fails
            with an error instead of a partial load. Leave them unset.
        base_model_family (`str`, *optional*):
            Recorded with the shape: the base model's family (`"clip"`, `"siglip"`); loading into a model of another
            family fails with an error naming this field. Leave it unset.
        modules_to_save (`list[str]`, *optional*):
            Accepted as PEFT's prompt-learning configs accept it, and refused unless empty: DPT keeps CLIP frozen.
    """

    class_names: ClassNames | None = field(
        default=None, metadata={"help": "Class names (a list), or a dict task -> list of class names."}
    )
    learn_text_context: bool = field(default=True, metadata={"help": "Learn the CoOp text context."})
    num_text_tokens: int = field(default=16, metadata={"help": "Number of learnable text context vectors."})
    text_init: str | None = field(
        default=None, metadata={"help": "Phrase that initializes the text context, e.g. 'a photo of a'."}
    )
    class_token_position: Literal["end", "middle", "front"] = field(
        default="end", metadata={"help": "Where the class name sits: 'end', 'middle' or 'front'."}
    )
    class_specific_context: bool = field(default=False, metadata={"help": "One text context per class."})
    num_visual_tokens: int = field(default=10, metadata={"help": "Deep visual prompts per vision layer (0: off)."})
    visual_depth: int | None = field(
        default=None, metadata={"help": "Number of vision layers with deep prompts (None: see docs)."}
    )
    class_aware: bool = field(default=True, metadata={"help": "Use class-aware visual prompts (CAVPT)."})
    class_aware_layer: int | None = field(
        default=None, metadata={"help": "First 0-based vision layer with class-aware prompts (None: last)."}
    )
    class_aware_top_k: int = field(default=10, metadata={"help": "Classes (prompts) per image for CAVPT."})
    class_aware_num_kv_tokens: int = field(default=10, metadata={"help": "Learnable key/value tokens of CAVPT."})
    class_aware_attention_dim: int = field(default=32, metadata={"help": "Query/key width of CAVPT attention."})
    class_aware_loss_weight: float = field(default=0.3, metadata={"help": "Weight of the auxiliary CAVPT loss."})
    zero_shot_template: str = field(
        default="a photo of a {}.", metadata={"help": "Template of the frozen zero-shot classifier."}
    )
    prompt_init_std: float = field(default=0.02, metadata={"help": "Std of random prompt initialization."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "CLIP tokenizer (None: the base model's name_or_path)."}
    )
    visual_prompt_init: Literal["random", "prototype"] = field(
        default="random", metadata={"help": "Deep visual prompt init: 'random' or 'prototype' (SPT)."}
    )
    init_from: list[str] | None = field(
        default=None, metadata={"help": "Source DPT adapters whose shared prompts initialize this one (MVLPT)."}
    )
    pad_text_to_context: bool = field(
        default=False, metadata={"help": "Pad prompts to the full text context (reference; slower, same result)."}
    )
    cache_class_features: bool = field(
        default=True, metadata={"help": "Cache class features at inference until prompts or class names change."}
    )
    text_encoding: Literal["auto", "shared_prefix", "full"] = field(
        default="auto",
        metadata={
            "help": "Class prompts' text path: 'auto' (shared prefix once when prompts share one), or force one."
        },
    )
    consistency_weights: tuple[float, float, float] | None = field(
        default=None,
        metadata={
            "help": "Self-consistency weights: image, text, logits (PromptSRC's 10 25 1, arxiv.org/abs/2307.06948)."
        },
    )
    consistency_templates: list[str] | None = field(
        default=None, metadata={"help": "Templates averaged for the consistency targets (None: zero_shot_template)."}
    )
    zero_shot_ensemble: float | None = field(
        default=None, metadata={"help": "At inference, weight of the adapter's probabilities; the rest zero-shot's."}
    )
    initialized_from: list[str] | None = field(
        default=None, metadata={"help": "Recorded: the init_from sources applied when the adapter was created."}
    )
    vision_hidden_size: int | None = field(default=None, metadata={"help": "Recorded from the base model."})
    vision_num_layers: int | None = field(default=None, metadata={"help": "Recorded from the base model."})
    text_hidden_size: int | None = field(default=None, metadata={"help": "Recorded from the base model."})
    projection_dim: int | None = field(default=None, metadata={"help": "Recorded from the base model."})
    base_model_family: str | None = field(default=None, metadata={"help": "Recorded from the base model."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "PEFT's; DPT refuses any."})

    # PEFT's injection reads `target_modules`; DPT derives its targets from the prompt settings instead.
    target_modules = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = DPT_PEFT_TYPE
        if self.task_type is None:
            self.task_type = DPT_TASK_TYPE
        self._validate()

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs) -> dict:
        """PEFT's reader, refusing an oversized file before reading it (`adapter_files.read_config_json`)."""
        return _saved_fields(read_config_json(path_json_file))

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, *, as_adapter: bool = False, **kwargs
    ) -> DPTConfig:
        """PEFT's loader, with a saved adapter checked once before anything is built from it: the folder complete and
        each file read once with bounds (`adapter_files.read_local_adapter`), another method's adapter refused, types
        and ranges (as for any config), every size against the weights' header when the weights are on this machine
        (PEFT checks a Hub adapter's when it loads them), and `init_from` dropped: it was applied when the adapter was
        made and is recorded as `initialized_from`, so a downloaded config never makes the loader read other paths or
        repos. `kwargs` are Hub download options (`revision`, `token`, ...), used for a Hub id. A config without
        weights (`config.save_pretrained`) loads alone, as PEFT's do, unless `as_adapter` (dpt_peft's loaders)."""
        folder = Path(pretrained_model_name_or_path, subfolder or "")
        weights = (folder / SAFETENSORS_WEIGHTS_NAME, folder / WEIGHTS_NAME)
        config_only = not as_adapter and (folder / CONFIG_NAME).is_file() and not any(p.exists() for p in weights)
        local = None if config_only else read_local_adapter(pretrained_model_name_or_path, subfolder)
        raw_config = read_config_json(folder / CONFIG_NAME) if config_only else local and local.raw_config
        where = str(folder if config_only else pretrained_model_name_or_path if local is None else local.folder)
        try:
            if raw_config is None:
                config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
            else:
                config = cls.from_peft_type(**cls.check_kwargs(**_saved_fields(raw_config)))
        except ValueError as err:
            if isinstance(err, UserInputError):  # already names the file and the fix
                raise
            raise AdapterFileError(f"Could not use the adapter in {where!r}: {err}") from err
        if not isinstance(config, DPTConfig):
            raise AdapterFileError(
                f"{where!r} holds a {getattr(config.peft_type, 'value', config.peft_type)} adapter, not a DPT one; "
                "load it with peft.AutoPeftModel or PeftModel.from_pretrained."
            )
        if local is not None:
            check_config_matches_weights(config, local.shapes, where)
        if config.init_from:
            note = "sources initialize an adapter when it is created, not when it is loaded."
            warnings.warn(
                f"Ignoring init_from={config.init_from} in {pretrained_model_name_or_path}: {note}", stacklevel=2
            )
            config.init_from = None
        return config

    @classmethod
    def for_method(cls, method: str, **kwargs) -> DPTConfig:
        """Config of one ablation row: `"coop"`, `"vpt"`, `"vpt_coop"` or `"dpt"`; `kwargs` override."""
        if method not in METHOD_PRESETS:
            raise UserInputError(f"method={method!r} is unknown; choose one of {sorted(METHOD_PRESETS)}.")
        return cls(**{**METHOD_PRESETS[method], **kwargs})

    @classmethod
    def user_field_names(cls) -> list[str]:
        """The fields a user sets (CLI flags, README table, run identity): DPT's own, less the recorded shape."""
        inherited = {f.name for f in dataclasses.fields(PeftConfig)}
        return [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in inherited and f.name not in (*RECORDED_FIELDS, "class_names", "modules_to_save")
        ]

    @property
    def tasks(self) -> dict[str, list[str]]:
        """Class names per task (a single-task adapter has the task `"default"`)."""
        if isinstance(self.class_names, dict):
            return {task: list(names) for task, names in self.class_names.items()}
        return {DEFAULT_TASK: list(self.class_names)}

    @property
    def has_visual_prompts(self) -> bool:
        return self.num_visual_tokens > 0

    def resolved_class_aware_layer(self, num_layers: int) -> int:
        return num_layers - 1 if self.class_aware_layer is None else self.class_aware_layer

    def visual_prompt_layers(self, num_layers: int) -> range:
        """Vision layers that get deep (VPT) prompts."""
        if not self.has_visual_prompts:
            return range(0)
        if self.visual_depth is not None:
            return range(self.visual_depth)
        if self.class_aware:
            return range(self.resolved_class_aware_layer(num_layers))
        return range(num_layers)

    def class_aware_layers(self, num_layers: int) -> range:
        """Vision layers that get class-aware prompts."""
        if not self.class_aware:
            return range(0)
        return range(self.resolved_class_aware_layer(num_layers), num_layers)

    def validate_for_model(self, backbone: Backbone) -> None:
        """Checks that need the base model (its shape, its text tower); raised before anything is injected."""
        check_config_for_model(self, backbone)

    def _validate(self) -> None:
        if self.modules_to_save:
            raise UserInputError(
                f"modules_to_save={self.modules_to_save!r}: DPT trains only prompts and needs the base model frozen "
                "(its zero-shot classifier picks the class-aware prompts); leave it unset, or use e.g. peft.LoraConfig."
            )
        validate_class_names(self.class_names)
        self._validate_numbers()
        self.consistency_weights = checked_consistency_weights(self.consistency_weights)
        self.consistency_templates = checked_consistency_templates(self.consistency_templates)
        self.zero_shot_ensemble = checked_zero_shot_ensemble(self.zero_shot_ensemble)
        if self.learn_text_context and self.text_init is None and self.num_text_tokens < 1:
            raise UserInputError(
                f"num_text_tokens={self.num_text_tokens}: the text context needs at least 1 token; set "
                "num_text_tokens >= 1, give text_init, or set learn_text_context=False."
            )
        if self.text_init is not None and not self.text_init.strip():
            raise UserInputError("text_init is empty; give a phrase such as 'a photo of a', or None for random init.")
        for name in ("num_text_tokens", "num_visual_tokens", "class_aware_num_kv_tokens"):
            if getattr(self, name) < 0:
                raise UserInputError(f"{name}={getattr(self, name)} is negative; use 0 or more.")
        for name in ("class_aware_top_k", "class_aware_attention_dim"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.visual_depth is not None and self.visual_depth < 1:
            raise UserInputError(
                f"visual_depth={self.visual_depth} must be at least 1; to disable deep visual prompts set "
                "num_visual_tokens=0."
            )
        if self.class_aware_layer is not None and self.class_aware_layer < 0:
            raise UserInputError(f"class_aware_layer={self.class_aware_layer} must be a 0-based layer index (>= 0).")
        if self.class_token_position not in ("end", "middle", "front"):
            raise UserInputError(f"class_token_position={self.class_token_position!r}; use 'end', 'middle' or 'front'.")
        if self.zero_shot_template.count("{}") != 1:
            raise UserInputError(
                f"zero_shot_template={self.zero_shot_template!r} must contain exactly one '{{}}' for the class name."
            )
        if self.text_encoding not in ("auto", "shared_prefix", "full"):
            raise UserInputError(f"text_encoding={self.text_encoding!r}; use 'auto', 'shared_prefix' or 'full'.")
        if self.visual_prompt_init not in ("random", "prototype"):
            raise UserInputError(f"visual_prompt_init={self.visual_prompt_init!r}; use 'random' or 'prototype'.")
        if isinstance(self.init_from, str):
            self.init_from = [self.init_from]
        if self.class_aware_loss_weight < 0:
            raise UserInputError(f"class_aware_loss_weight={self.class_aware_loss_weight} must be >= 0.")
        if self.prompt_init_std <= 0:
            raise UserInputError(f"prompt_init_std={self.prompt_init_std} must be > 0.")
        if self.class_specific_context and isinstance(self.class_names, dict) and len(self.class_names) > 1:
            raise UserInputError(
                "class_specific_context=True ties the context to one label space; it cannot be combined with "
                "several tasks in class_names. Use a shared context (class_specific_context=False)."
            )

    def _validate_numbers(self) -> None:
        """Counts are whole numbers (layer counts up to `MAX_SIZE`), floats finite, texts strings, before any check."""
        for name in (*INTEGER_FIELDS, *BASE_SHAPE_FIELDS):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise UserInputError(f"{name}={value!r} must be a whole number (an int), e.g. {name}=10.")
            if value is not None and value > MAX_SIZE and name in RANGE_FIELDS:
                raise UserInputError(f"{name}={value} is beyond any model (at most {MAX_SIZE}); check the config.")
        for name in TEXT_FIELDS:
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise UserInputError(f"{name}={getattr(self, name)!r} must be text (a string).")
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserInputError(f"{name}={value!r} must be a finite number.")
        for name in BOOLEAN_FIELDS:  # a JSON "false" or "no" would otherwise act as True
            if not isinstance(getattr(self, name), bool):
                raise UserInputError(f"{name}={getattr(self, name)!r} must be true or false (a boolean, not a string).")
