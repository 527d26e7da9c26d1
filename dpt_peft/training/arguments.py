"""Command-line arguments of `examples/train.py`: the training recipe plus every DPTConfig field."""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

from ..config import DPTConfig
from ..data.catalog import COOP_DATASETS
from .recipe import uses_guidance

# Every DPTConfig field a user sets is a flag (they override the --method preset).
CONFIG_FLAGS = tuple(DPTConfig.user_field_names())
# DPTConfig values of the embedded toy tasks where the paper's do not fit: the toy CLIP's text context has
# 16 positions, too few for 16 context tokens plus a class name.
TOY_CONFIG_DEFAULTS = {"num_text_tokens": 4}
# Arguments that may differ between a run and its resumption.
RESUMABLE = (
    "resume_from_checkpoint",
    "overwrite_output_dir",
    "push_to_hub",
    "hub_model_id",
    "base_model_id",
    "report_to",
    "torch_compile",
    "verbose",
    "dataloader_num_workers",
    "gradient_checkpointing",
)


@dataclass
class TrainArguments:
    """The DPT recipe of docs/method.md, section 5 (SGD, two parameter groups, cosine, guidance first)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "CLIP to adapt (local dir or Hub id); default: the shipped toy CLIP."}
    )
    dataset: str = field(
        default="toy-position",
        metadata={
            "help": "Hub dataset, local imagefolder, or a toy task: toy-position, toy-shape, toy-size, toy-colour."
        },
    )
    data_root: str | None = field(
        default=None,
        metadata={"help": "Folder holding the CoOp benchmark datasets (CoOp's DATASETS.md) when --dataset names one."},
    )
    split_file: str | None = field(
        default=None,
        metadata={"help": "Few-shot split JSON written by an earlier run (splits/<dataset>.json) to reuse."},
    )
    subsample_classes: Literal["all", "base", "new"] = field(
        default="all",
        metadata={"help": "Base-to-new: train/evaluate on the first half of the classes (base) or the rest (new)."},
    )
    tasks: str | None = field(
        default=None,
        metadata={"help": "Comma-separated datasets trained jointly, one task each (multitask); replaces --dataset."},
    )
    task_sampling: Literal["proportional", "uniform"] = field(
        default="proportional", metadata={"help": "Multitask batches: in proportion to task size, or uniform."}
    )
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding integer labels."})
    class_names_file: str | None = field(
        default=None, metadata={"help": "One class name per line (default: the label column's ClassLabel names)."}
    )
    train_split: str = field(default="train", metadata={"help": "Split the few-shot training set is drawn from."})
    test_split: str | None = field(
        default="test", metadata={"help": "Held-out split; when missing, the images not drawn for training."}
    )
    shots: int = field(default=16, metadata={"help": "Training images per class."})
    method: Literal["coop", "vpt", "vpt_coop", "dpt"] = field(
        default="dpt", metadata={"help": "Ablation preset; DPTConfig flags override it."}
    )
    augment: bool | None = field(
        default=None,
        metadata={"help": "Random resized crop + horizontal flip, as in the paper (default: on, off on toy tasks)."},
    )
    min_crop_scale: float = field(
        default=0.08, metadata={"help": "Smallest area fraction of the random resized crop (0.08 as in CoOp/DPT)."}
    )
    epochs: int = field(default=60, metadata={"help": "Training epochs (60 in the DPT script)."})
    batch_size: int = field(default=32, metadata={"help": "Images per step and process."})
    input_pipeline: Literal["auto", "pil", "decoded_cache"] = field(
        default="auto",
        metadata={
            "help": "Training images: 'decoded_cache' decodes each once (cached by content under $DPT_PEFT_CACHE) "
            "and augments batches on the device; 'pil' decodes and augments with PIL every epoch; 'auto': the "
            "cache on CUDA, PIL on CPU (where the device is the host)."
        },
    )
    dataloader_num_workers: int | None = field(
        default=None,
        metadata={"help": "Worker processes of the decoding loaders (default: up to 8 on CUDA, 0 on CPU)."},
    )
    eval_batch_size: int = field(default=256, metadata={"help": "Images per evaluation batch."})
    visual_lr: float = field(default=0.01, metadata={"help": "LR of visual prompts and CAVPT."})
    text_lr: float = field(default=0.002, metadata={"help": "LR of the text context."})
    visual_warmup_epochs: int | None = field(
        default=None, metadata={"help": "Constant warm-up epochs of the visual group (default: 10; 1 on imagenet)."}
    )
    text_warmup_epochs: int = field(default=1, metadata={"help": "Constant warm-up epochs of the text group."})
    warmup_lr: float = field(default=1e-5, metadata={"help": "LR during the constant warm-up."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay."})
    guidance_epochs: int | None = field(
        default=None,
        metadata={"help": "Epochs of general-knowledge guidance (default: half the epochs; 0 for coop and vpt)."},
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Steps per optimizer update."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute CLIP's layer activations in backward: less memory, more time."}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "CLIP attention: 'sdpa' or 'eager'."})
    torch_compile: bool | None = field(
        default=None,
        metadata={"help": "Compile with torch.compile (inductor); default: the launcher's dynamo setting, else off."},
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None,
        metadata={"help": "Autocast precision; default: the launcher's (accelerate launch / config file), else 'no'."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of few-shot sampling, prompts and augmentation."})
    output_dir: str = field(default="outputs/dpt-toy", metadata={"help": "Adapter, metrics, plots, checkpoints."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a different run in output_dir."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' or a checkpoint directory to continue from."}
    )
    checkpoints_to_keep: int = field(default=2, metadata={"help": "Most recent epoch checkpoints kept on disk."})
    prototype_method: Literal["kmeans", "random", "mean_pool"] = field(
        default="kmeans", metadata={"help": "How --visual_prompt_init prototype picks tokens (SPT)."}
    )
    prototype_max_images: int = field(default=512, metadata={"help": "Images that prototype init looks at."})
    eval_every: int = field(
        default=0,
        metadata={
            "help": "Evaluate on the few-shot validation split every N epochs (0: never); the test split is "
            "only used for the final report."
        },
    )
    save_best: bool = field(
        default=False, metadata={"help": "Keep the adapter of the best validation epoch in best_adapter/."}
    )
    verbose: bool = field(default=False, metadata={"help": "Log INFO messages (default: warnings and a progress bar)."})
    report_to: str = field(default="tensorboard", metadata={"help": "Accelerate tracker, or 'none'."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the final adapter to the Hub."})
    base_model_id: str | None = field(
        default=None,
        metadata={"help": "Hub id of the base CLIP for the model card, when --model_name_or_path is a local copy."},
    )
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id for --push_to_hub."})

    def __post_init__(self) -> None:
        if self.augment is None:
            self.augment = not self.is_toy_task
        for name in (
            "shots",
            "epochs",
            "batch_size",
            "eval_batch_size",
            "gradient_accumulation_steps",
            "prototype_max_images",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)} must be at least 1.")
        for name in ("visual_lr", "text_lr", "warmup_lr"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"--{name} {getattr(self, name)} must be a positive, finite learning rate.")
        if self.dataloader_num_workers is not None and self.dataloader_num_workers < 0:
            raise ValueError(f"--dataloader_num_workers {self.dataloader_num_workers} must be 0 or more.")
        if self.eval_every < 0:
            raise ValueError(f"--eval_every {self.eval_every} must be 0 (off) or a number of epochs.")
        if self.save_best and not self.eval_every:
            raise ValueError("--save_best needs validation: pass --eval_every N (e.g. 1).")
        for name in ("visual_warmup_epochs", "text_warmup_epochs", "guidance_epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name} {getattr(self, name)} must be 0 or more epochs.")
        if not 0 < self.min_crop_scale <= 1:
            raise ValueError(f"--min_crop_scale {self.min_crop_scale} is an area fraction: use a value in (0, 1].")
        if not 0 <= self.momentum < 1 or not 0 <= self.weight_decay < 1:
            raise ValueError("--momentum and --weight_decay must lie in [0, 1).")
        benchmark = [name for name in self.datasets if name in COOP_DATASETS]
        if benchmark and not self.data_root:
            raise ValueError(
                f"--dataset {benchmark[0]} is a CoOp benchmark dataset: pass --data_root, the folder that holds "
                f"{COOP_DATASETS[benchmark[0]].directory}/ as laid out in CoOp's DATASETS.md."
            )
        if self.split_file and len(self.datasets) > 1:
            raise ValueError("--split_file holds one dataset's split; it cannot be combined with several --tasks.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/dpt-adapter).")

    @property
    def datasets(self) -> list[str]:
        """One dataset per task; a single-task run has one."""
        return [d.strip() for d in self.tasks.split(",") if d.strip()] if self.tasks else [self.dataset]

    @property
    def is_toy_task(self) -> bool:
        return all(d.startswith("toy-") for d in self.datasets)

    @property
    def resolved_guidance_epochs(self) -> int:
        """Half the epochs for the methods the reference trains with guidance (`recipe.uses_guidance`), else 0."""
        if self.guidance_epochs is not None:
            return self.guidance_epochs
        return self.epochs // 2 if uses_guidance(self.method) else 0

    @property
    def resolved_visual_warmup_epochs(self) -> int:
        """10 warm-up epochs of the visual group, as the reference; 1 on ImageNet (catalog's per-dataset value)."""
        if self.visual_warmup_epochs is not None:
            return self.visual_warmup_epochs
        specs = [COOP_DATASETS[name] for name in self.datasets if name in COOP_DATASETS]
        return min((s.visual_warmup_epochs for s in specs if s.visual_warmup_epochs is not None), default=10)

    def run_identity(self, config: DPTConfig) -> dict:
        """What defines a run: resuming or re-using an output dir requires the same values."""
        identity = {k: v for k, v in dataclasses.asdict(self).items() if k not in RESUMABLE}
        identity["dpt_config"] = {k: getattr(config, k) for k in ("class_names", *CONFIG_FLAGS)}
        return identity


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, hint, default) -> None:
    options: dict = {"default": default, "help": f.metadata.get("help")}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        options["choices"] = list(args)
    elif origin is list:
        options.update(nargs="+", type=args[0])
    elif hint is bool:
        options.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
    else:
        options["type"] = hint
    parser.add_argument(f"--{f.name}", **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a DPT adapter on a frozen CLIP (defaults: the embedded toy task).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(TrainArguments)
    for f in dataclasses.fields(TrainArguments):
        _add_field(parser, f, hints[f.name], f.default)
    group = parser.add_argument_group("DPTConfig (override the --method preset)")
    config_hints = typing.get_type_hints(DPTConfig)
    config_fields = {f.name: f for f in dataclasses.fields(DPTConfig)}
    for name in CONFIG_FLAGS:
        _add_field(group, config_fields[name], config_hints[name], None)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[TrainArguments, dict]:
    """Training arguments, and the DPTConfig values given explicitly on the command line."""
    namespace = vars(build_parser().parse_args(argv))
    given = {k: namespace.pop(k) for k in CONFIG_FLAGS}
    config_overrides = {k: v for k, v in given.items() if v is not None}
    args = TrainArguments(**namespace)
    if args.is_toy_task:
        config_overrides = {**TOY_CONFIG_DEFAULTS, **config_overrides}
    templates = {COOP_DATASETS[name].template for name in args.datasets if name in COOP_DATASETS}
    if len(templates) == 1 and "zero_shot_template" not in config_overrides:
        config_overrides["zero_shot_template"] = templates.pop()  # the reference's template for this dataset
    return args, config_overrides
