"""`DPTTrainer`: `transformers.Trainer` with the paper's recipe, for users whose training code is a Trainer.

The optimizer (SGD in two groups by parameter kind), the per-epoch warm-up + restarted-cosine schedule and the
general-knowledge guidance of the first epochs come from `training/recipe.py` (`Recipe`), the same code as the
Accelerate loop of `dpt-peft train`; TrainingArguments keeps everything else (batch size, epochs, logging, saving,
evaluation, precision).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from ..data.batching import INDEX_COLUMN, ImageBatcher
from ..peft_model import NON_PREDICTION_OUTPUTS
from ..training.recipe import Recipe, build_optimizer, build_scheduler


class TrainerCollator:
    """A collate function (e.g. `data.batching.ImageBatcher`) for transformers' Trainer: its batches also carry
    `return_loss`, which lets a plain `Trainer` report eval_loss. Trainer inspects CLIPModel.forward (a PEFT model
    hides ours) and so finds no `labels` argument; DPTPeftModel.forward ignores the flag."""

    def __init__(self, collate: Callable[[list[dict]], dict | None]):
        self.collate = collate

    def __call__(self, rows: list[dict]) -> dict | None:
        batch = self.collate(rows)
        return None if batch is None else {**batch, "return_loss": True}

    def for_evaluation(self) -> TrainerCollator:
        """This collate function without augmentation (what `DPTTrainer` evaluates and predicts with): an
        `ImageBatcher` in training mode becomes one in evaluation mode; any other collate function is kept."""
        if isinstance(self.collate, ImageBatcher) and self.collate.train:
            return TrainerCollator(dataclasses.replace(self.collate, train=False))
        return self


class DPTImageCollator(TrainerCollator):
    """The collate function for a Trainer on an image dataset (an `imagefolder`, a Hub dataset): rows with an image
    and an integer label column become `{"pixel_values", "labels", "return_loss"}`, preprocessed by the base
    model's image processor; unreadable images are skipped with a warning.

    `augment=True` adds the paper's random resized crop and horizontal flip. Each crop is drawn from (seed, epoch,
    row): from the row's `__index__` column where the dataset has one (as `dpt-peft train` adds), else from the
    row's position in the stream of rows this collator has seen.
    """

    def __init__(
        self,
        processor: Any,
        image_column: str = "image",
        label_column: str = "label",
        augment: bool = False,
        seed: int = 0,
        min_crop_scale: float = 0.08,
    ) -> None:
        self.batcher = ImageBatcher(
            processor, image_column, label_column, train=augment, seed=seed, min_crop_scale=min_crop_scale
        )
        self._rows_seen = itertools.count()
        super().__init__(self._collate)

    def _collate(self, rows: list[dict]) -> dict | None:
        if self.batcher.train:
            rows = [row if INDEX_COLUMN in row else {**row, INDEX_COLUMN: next(self._rows_seen)} for row in rows]
        return self.batcher(rows)

    def for_evaluation(self) -> TrainerCollator:
        return TrainerCollator(dataclasses.replace(self.batcher, train=False))


class DPTTrainer(Trainer):
    """A `Trainer` for DPT adapters with the paper's recipe.

    Args:
        model: the `DPTPeftModel` from `get_peft_model(clip, DPTConfig(...))`.
        args: `TrainingArguments`. Its `num_train_epochs` sets the schedule's length; `learning_rate`,
            `lr_scheduler_type`, `warmup_*` and `weight_decay` are replaced by the recipe (pass `recipe` to change it).
        recipe: a `Recipe` (`Recipe.for_method(...)`; `TrainArguments.recipe`); its `epochs` are set to
            `num_train_epochs`. Default: the paper's, for `method="dpt"`.
        **kwargs: as `Trainer` (`train_dataset`, `eval_dataset`, `data_collator`, `compute_metrics`, ...); the
            `data_collator` is wrapped in a `TrainerCollator`.

    Labels are found without `label_names` (a PEFT model hides our forward's `labels` from Trainer's signature
    inspection), and `remove_unused_columns` is turned off: the collate function needs the image column. Evaluation
    and prediction never augment: one `DPTImageCollator(processor, augment=True)` (or an augmenting `ImageBatcher`)
    serves training, and its non-augmenting twin (`for_evaluation`) the evaluation and test dataloaders.
    """

    def __init__(self, model, args: TrainingArguments, recipe: Recipe | None = None, **kwargs: Any) -> None:
        args.label_names = args.label_names or ["labels"]
        args.remove_unused_columns = False
        epochs = math.ceil(args.num_train_epochs)
        self.recipe = Recipe.for_method("dpt", epochs) if recipe is None else dataclasses.replace(recipe, epochs=epochs)
        collator = kwargs.get("data_collator")
        if collator is not None and not isinstance(collator, TrainerCollator):
            kwargs["data_collator"] = TrainerCollator(collator)
        super().__init__(model=model, args=args, **kwargs)

    def get_eval_dataloader(self, eval_dataset=None):
        with self._collating_for_evaluation():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._collating_for_evaluation():
            return super().get_test_dataloader(test_dataset)

    @contextlib.contextmanager
    def _collating_for_evaluation(self) -> Iterator[None]:
        """Trainer builds every dataloader from `self.data_collator`: the non-augmenting one, while an evaluation or
        test dataloader is built."""
        training = self.data_collator
        if isinstance(training, TrainerCollator):
            self.data_collator = training.for_evaluation()
        try:
            yield
        finally:
            self.data_collator = training

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
        """Predictions are the logits alone: compute_metrics gets one array (a plain Trainer gathers every output)."""
        ignore_keys = ignore_keys or NON_PREDICTION_OUTPUTS
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def compute_loss(self, model, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        """The DPT loss; with the guidance loss during the recipe's first epochs (training only). Under gradient
        accumulation the model divides the summed loss by `num_items_in_batch`, as Trainer expects of it."""
        guidance = model.training and self.recipe.guidance(int(self.state.epoch or 0))
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        outputs = model(**inputs, guidance=guidance)
        return (outputs.loss, outputs) if return_outputs else outputs.loss
