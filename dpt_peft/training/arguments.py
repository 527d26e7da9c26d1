"""`TrainArguments`: every setting of a training run, checked when made; the narrow views the layers take
(`data_spec`, `recipe`) and the DPTConfig values a run adds to the given ones (`config_overrides`). The command line
that fills them is built from these fields in `dpt_peft/cli.py`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..config import DPTConfig
from ..data.catalog import COOP_DATASETS
from ..data.spec import DataSpec
from ..sources import SHIPPED_MODEL_FITS, TOY_CLIP_ID, TOY_SIGLIP_ID
from ..utils.errors import InputTypeError, UserInputError
from .lora_arguments import FLOAT32_MAX, LoraArguments
from .prompt_averaging import check_prompt_averaging
from .recipe import LoraRecipe, Recipe, guidance_epochs_for
from .run_identity import run_identity
from .run_layout import default_output_dir

# Every DPTConfig field a user sets is a flag (they override the --method preset).
CONFIG_FLAGS = tuple(DPTConfig.user_field_names())
# DPTConfig values of the toy CLIP where the paper's do not fit (any dataset): its text context has 16 positions, too
# few for 16 context tokens plus a class name.
TOY_CONFIG_DEFAULTS = SHIPPED_MODEL_FITS[TOY_CLIP_ID]
# Per shipped model. The toy SigLIP (same 16-position context) also takes 2 visual prompts per layer, not 10: with
# no CLS token its 16 patch tokens are all it pools, and 10 random prompts beside them cost more than they learn
# (toy-position, seed 1: zero-shot 83.7%, DPT 54.5% with 10 prompts, 73.8% with 4, 87.7% with 2).
SHIPPED_CONFIG_DEFAULTS = {
    TOY_CLIP_ID: TOY_CONFIG_DEFAULTS,
    TOY_SIGLIP_ID: {**TOY_CONFIG_DEFAULTS, "num_visual_tokens": 2},
}
# A `datasets` object given as `dataset`: its name in metrics, reports and the model card.
GIVEN_DATASET_NAME = "dataset"


@dataclass
class TrainArguments(LoraArguments):
    """The DPT recipe of docs/method.md, section 5 (SGD, two parameter groups, cosine, guidance first)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "CLIP to adapt (local dir or Hub id); default: the shipped toy CLIP."}
    )
    dataset: str = field(
        default="toy-position",
        metadata={
            "help": "Hub dataset, local imagefolder, or a toy task: toy-position, toy-shape, toy-size, toy-colour. "
            "In Python also a datasets.Dataset or DatasetDict."
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
    method: Literal["coop", "vpt", "vpt_coop", "dpt", "linear_probe", "lora"] = field(
        default="dpt",
        metadata={
            "help": "Ablation preset (DPTConfig flags override it); linear_probe: logistic regression on the frozen "
            "image features (CoOp's baseline; pip install 'dpt-peft[probe]')."
        },
    )
    augment: bool | None = field(
        default=None,
        metadata={"help": "Random resized crop + horizontal flip, as in the paper (default: on, off on toy tasks)."},
    )
    min_crop_scale: float = field(
        default=0.08, metadata={"help": "Smallest area fraction of the random resized crop (0.08 as in CoOp/DPT)."}
    )
    epochs: int = field(
        default=Recipe.epochs,
        metadata={"help": "Training epochs (60 in the DPT script).", "aliases": ["--num_train_epochs"]},
    )
    batch_size: int = field(
        default=32,
        metadata={"help": "Images per step and process.", "aliases": ["--per_device_train_batch_size"]},
    )
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
    visual_lr: float = field(default=Recipe.visual_lr, metadata={"help": "LR of visual prompts and CAVPT."})
    text_lr: float = field(default=Recipe.text_lr, metadata={"help": "LR of the text context."})
    visual_warmup_epochs: int | None = field(
        default=None, metadata={"help": "Constant warm-up epochs of the visual group (default: 10; 1 on imagenet)."}
    )
    text_warmup_epochs: int = field(
        default=Recipe.text_warmup_epochs, metadata={"help": "Constant warm-up epochs of the text group."}
    )
    warmup_lr: float = field(default=Recipe.warmup_lr, metadata={"help": "LR during the constant warm-up."})
    momentum: float = field(default=Recipe.momentum, metadata={"help": "SGD momentum."})
    weight_decay: float = field(default=Recipe.weight_decay, metadata={"help": "SGD weight decay."})
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
    seed: int = field(default=1, metadata={"help": "Seed of few-shot sampling, prompts and augmentation (CoOp: 1)."})
    skip_missing_images: bool = field(
        default=False, metadata={"help": "Leave out (and count) images a CoOp split lists but the disk lacks."}
    )
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Adapter, metrics, plots, checkpoints; default: a folder per base model (outputs/dpt-toy for the "
            "toy CLIP, outputs/dpt-toy-siglip for the toy SigLIP, outputs/dpt-<model name> for another)."
        },
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a different run in output_dir."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' or a checkpoint directory to continue from."}
    )
    checkpoints_to_keep: int = field(
        default=2, metadata={"help": "Most recent epoch checkpoints kept on disk.", "aliases": ["--save_total_limit"]}
    )
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
    eval_strategy: Literal["no", "epoch"] | None = field(
        default=None, metadata={"help": "As TrainingArguments: 'epoch' is --eval_every 1, 'no' is --eval_every 0."}
    )
    save_best: bool = field(
        default=False,
        metadata={
            "help": "As TrainingArguments' load_best_model_at_end: the final adapter/ and metrics.json are of the "
            "best validation epoch (adapter_epoch); the last epoch is kept in last_adapter/ when it differs.",
            "aliases": ["--load_best_model_at_end"],
        },
    )
    prompt_averaging: Literal["none", "gaussian"] = field(
        default="none",
        metadata={"help": "'gaussian': save the Gaussian-weighted average of the epochs' prompts (GPA)."},
    )
    prompt_averaging_mean: float | None = field(
        default=None, metadata={"help": "GPA's centre, an epoch (1-based); default 0.75 x --epochs (PromptSRC: 15/20)."}
    )
    prompt_averaging_std: float | None = field(
        default=None, metadata={"help": "GPA's std in epochs; default 0.05 x --epochs (PromptSRC: 1 of 20)."}
    )
    verbose: bool = field(default=False, metadata={"help": "Log INFO messages (default: warnings and a progress bar)."})
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={"help": "Accelerate trackers (tensorboard, wandb, ...; a list or comma-separated), or 'none'."},
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Push the final adapter to the Hub."})
    base_model_id: str | None = field(
        default=None,
        metadata={"help": "Hub id of the base CLIP for the model card, when --model_name_or_path is a local copy."},
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repo id for --push_to_hub (default: the --output_dir folder's name)."}
    )

    def __post_init__(self) -> None:
        self._take_dataset_object()
        if self.output_dir is None:  # each base model its own run folder: README's commands run one after another
            self.output_dir = default_output_dir(self.model_name_or_path, self.method)
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        self.report_to = [name.strip() for entry in self.report_to for name in entry.split(",") if name.strip()]
        if self.eval_strategy is not None:
            self.eval_every = 1 if self.eval_strategy == "epoch" else 0
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
                raise UserInputError(f"--{name} {getattr(self, name)} must be at least 1.")
        for name in ("visual_lr", "text_lr", "warmup_lr"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise UserInputError(f"--{name} {getattr(self, name)} must be a positive, finite learning rate.")
            if getattr(self, name) > FLOAT32_MAX:  # the optimizer would overflow at once: the run cannot but diverge
                raise UserInputError(
                    f"--{name} {getattr(self, name)} does not fit a float32 parameter update (the run would diverge "
                    "at its first step); use a learning rate such as 0.002."
                )
        self.check_lora()
        if self.dataloader_num_workers is not None and self.dataloader_num_workers < 0:
            raise UserInputError(f"--dataloader_num_workers {self.dataloader_num_workers} must be 0 or more.")
        if self.eval_every < 0:
            raise UserInputError(f"--eval_every {self.eval_every} must be 0 (off) or a number of epochs.")
        if self.save_best and not self.eval_every:
            raise UserInputError(
                "--save_best needs validation: pass --eval_every N (e.g. 1) or --eval_strategy epoch "
                "(--load_best_model_at_end is --save_best)."
            )
        averaging = (self.prompt_averaging, self.prompt_averaging_mean, self.prompt_averaging_std)
        check_prompt_averaging(*averaging, self.epochs, self.save_best)
        for name in ("visual_warmup_epochs", "text_warmup_epochs", "guidance_epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise UserInputError(f"--{name} {getattr(self, name)} must be 0 or more epochs.")
        if not 0 < self.min_crop_scale <= 1:
            raise UserInputError(f"--min_crop_scale {self.min_crop_scale} is an area fraction: use a value in (0, 1].")
        if not 0 <= self.momentum < 1 or not 0 <= self.weight_decay < 1:
            raise UserInputError("--momentum and --weight_decay must lie in [0, 1).")
        benchmark = [name for name in self.datasets if name in COOP_DATASETS]
        if benchmark and not self.data_root:
            raise UserInputError(
                f"--dataset {benchmark[0]} is a CoOp benchmark dataset: pass --data_root, the folder that holds "
                f"{COOP_DATASETS[benchmark[0]].directory}/ as laid out in CoOp's DATASETS.md."
            )
        if self.split_file and len(self.datasets) > 1:
            raise UserInputError("--split_file holds one dataset's split; it cannot be combined with several --tasks.")
        if self.push_to_hub:
            try:
                validate_repo_id(self.hub_repo_id)
            except HFValidationError as err:
                flag = "--hub_model_id" if self.hub_model_id else "the --output_dir folder's name (--hub_model_id)"
                raise UserInputError(
                    f"--push_to_hub: {self.hub_repo_id!r}, {flag}, is not a valid Hub repo id ({err}); pass "
                    "--hub_model_id your-name/repo-name."
                ) from err

    def _take_dataset_object(self) -> None:
        """`dataset=` a `datasets.Dataset` (its train split) or `DatasetDict`: kept aside as the run's only task,
        named `GIVEN_DATASET_NAME`; anything but these and a name is refused here, not deep in the data layer."""
        from datasets import Dataset, DatasetDict

        given = self.dataset
        if isinstance(given, str):
            self.given_dataset = getattr(self, "given_dataset", None) if given == GIVEN_DATASET_NAME else None
            return
        if not isinstance(given, (Dataset, DatasetDict)):
            raise InputTypeError(
                f"dataset={type(given).__name__}: give a dataset name or folder (str), a datasets.Dataset (used as "
                "the train split) or a datasets.DatasetDict."
            )
        if self.tasks:
            raise UserInputError("A datasets object as dataset= is one task; it cannot be combined with --tasks.")
        self.given_dataset = DatasetDict({self.train_split: given}) if isinstance(given, Dataset) else given
        self.dataset = GIVEN_DATASET_NAME

    @property
    def hub_repo_id(self) -> str:
        """--hub_model_id, else the output folder's name (as transformers' Trainer)."""
        return self.hub_model_id or Path(self.output_dir).resolve().name

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
        return guidance_epochs_for(self.method, self.epochs)

    @property
    def resolved_visual_warmup_epochs(self) -> int:
        """10 warm-up epochs of the visual group, as the reference; 1 on ImageNet (catalog's per-dataset value)."""
        if self.visual_warmup_epochs is not None:
            return self.visual_warmup_epochs
        specs = [COOP_DATASETS[name] for name in self.datasets if name in COOP_DATASETS]
        default = Recipe.visual_warmup_epochs
        return min((s.visual_warmup_epochs for s in specs if s.visual_warmup_epochs is not None), default=default)

    @property
    def recipe(self) -> Recipe | LoraRecipe:
        """The optimizer, schedule and guidance settings, resolved (CLIP-LoRA's for --method lora)."""
        if self.method == "lora":
            return self.lora_recipe
        return Recipe(
            visual_lr=self.visual_lr,
            text_lr=self.text_lr,
            visual_warmup_epochs=self.resolved_visual_warmup_epochs,
            text_warmup_epochs=self.text_warmup_epochs,
            warmup_lr=self.warmup_lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            epochs=self.epochs,
            guidance_epochs=self.resolved_guidance_epochs,
        )

    @property
    def data_spec(self) -> DataSpec:
        """What the data layer reads."""
        return DataSpec(
            datasets=tuple(self.datasets),
            data_root=self.data_root,
            split_file=self.split_file,
            subsample_classes=self.subsample_classes,
            image_column=self.image_column,
            label_column=self.label_column,
            class_names_file=self.class_names_file,
            train_split=self.train_split,
            test_split=self.test_split,
            shots=self.shots,
            seed=self.seed,
            eval_every=self.eval_every,
            skip_missing_images=self.skip_missing_images,
            given={GIVEN_DATASET_NAME: self.given_dataset} if self.given_dataset is not None else {},
        )

    def config_overrides(self, given: dict) -> dict:
        """The DPTConfig values of this run: `given` (explicit flags), plus a shipped toy model's settings and the
        reference's zero-shot template of a CoOp dataset unless given."""
        overrides = {**SHIPPED_CONFIG_DEFAULTS.get(self.model_name_or_path or TOY_CLIP_ID, {}), **given}
        templates = {COOP_DATASETS[name].template for name in self.datasets if name in COOP_DATASETS}
        if len(templates) == 1 and "zero_shot_template" not in overrides:
            overrides["zero_shot_template"] = templates.pop()
        return overrides

    def run_identity(self, config: DPTConfig | None) -> dict:
        """What defines a run (`run_identity.run_identity`): resuming or re-using an output dir requires it equal."""
        return run_identity(dataclasses.asdict(self), self.unused_fields, config, CONFIG_FLAGS)
