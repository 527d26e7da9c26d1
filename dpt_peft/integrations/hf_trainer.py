"""`DPTTrainer`: `transformers.Trainer` with the paper's recipe, for users whose training code is a Trainer.

The optimizer (SGD in two groups by parameter kind), the per-epoch warm-up + restarted-cosine schedule and the
general-knowledge guidance of the first epochs come from `training/recipe.py` and `TrainArguments`, the same code
as the Accelerate loop of `dpt-peft train`; TrainingArguments keeps everything else (batch size, epochs, logging,
saving, evaluation, precision).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from ..outputs import DPTOutput
from ..training.arguments import TrainArguments
from ..training.recipe import build_optimizer, build_scheduler


class DPTTrainer(Trainer):
    """A `Trainer` for DPT adapters with the paper's recipe.

    Args:
        model: the `DPTPeftModel` from `get_peft_model(clip, DPTConfig(...))`.
        args: `TrainingArguments`. Its `num_train_epochs` sets the schedule's length; `learning_rate`,
            `lr_scheduler_type`, `warmup_*` and `weight_decay` are replaced by the recipe (pass `recipe` to change it).
        recipe: the recipe's values (`visual_lr`, `text_lr`, warm-up epochs, `momentum`, `weight_decay`,
            `guidance_epochs`, `method` for whether guidance applies); default: the paper's, for `method="dpt"`.
        **kwargs: as `Trainer` (`train_dataset`, `eval_dataset`, `data_collator`, `compute_metrics`, ...).

    Labels are found without `label_names` (a PEFT model hides our forward's `labels` from Trainer's signature
    inspection), and `remove_unused_columns` is turned off: the collate function needs the image column.
    """

    def __init__(self, model, args: TrainingArguments, recipe: TrainArguments | None = None, **kwargs: Any) -> None:
        args.label_names = args.label_names or ["labels"]
        args.remove_unused_columns = False
        epochs = math.ceil(args.num_train_epochs)
        recipe = recipe or TrainArguments(report_to="none")
        self.recipe = dataclasses.replace(recipe, epochs=epochs)
        super().__init__(model=model, args=args, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = build_optimizer(self.model if model is None else model, self.recipe)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None:
            steps_per_epoch = max(1, math.ceil(num_training_steps / self.recipe.epochs))
            self.lr_scheduler = build_scheduler(optimizer or self.optimizer, self.recipe, steps_per_epoch)
        return self.lr_scheduler

    def prediction_step(self, model, inputs: dict, prediction_loss_only: bool, ignore_keys: list[str] | None = None):
        """Predictions are the logits (the other outputs, e.g. class features, have no batch dimension to gather)."""
        extra_outputs = [name for name in DPTOutput.__dataclass_fields__ if name not in ("loss", "logits")]
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys or extra_outputs)

    def compute_loss(self, model, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        """The DPT loss; with the guidance loss during the recipe's first epochs (training only)."""
        guidance = model.training and int(self.state.epoch or 0) < self.recipe.resolved_guidance_epochs
        outputs = model(**inputs, guidance=guidance)
        return (outputs.loss, outputs) if return_outputs else outputs.loss
