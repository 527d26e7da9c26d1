"""Evaluation of an adapted model as a small pipeline: `evaluate_split` scores one split (the one result shape,
`SplitMetrics`, of training reports and `dpt-peft evaluate`); `evaluate` scores an adapter on a dataset split, and on
its base and new classes apart (CoCoOp's rule, `data.coop_splits.base_new_labels`); `write_evaluation_report` writes
eval_metrics.json and the per-class PNG; `evaluate_adapter` is the three in order, as `dpt-peft evaluate` runs them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import evaluate as hf_evaluate
import numpy as np
import torch
from accelerate import Accelerator, PartialState
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..class_names import display_names
from ..config import DPTConfig
from ..data.batching import ReportingImageBatcher, SkipCounter, undecoded
from ..data.catalog import COOP_DATASETS
from ..data.coop_readers import missing_images
from ..data.coop_splits import base_new_labels, keep_classes
from ..data.loaders import EvalLoader
from ..lora_adapter import LoraClassifierConfig
from ..lora_classifier import LoraClassifier
from ..metrics import ACCURACY_PATH
from ..sources import load_adapted_model, read_adapter_config
from ..utils.errors import UserInputError
from ..utils.plots import plot_per_class
from ..utils.write_policy import OutputFolder
from .ensemble import ensemble_in_effect, set_zero_shot_ensemble

EVAL_REPORTS = ("eval_metrics.json", "per_class_accuracy.png")  # what evaluate writes into its --output_dir


@dataclass(frozen=True)
class SplitMetrics:
    """The adapter's and the zero-shot model's numbers on one held-out split (metrics.json, eval_metrics.json)."""

    zero_shot_accuracy: float
    accuracy: float
    zero_shot_mean_per_class_accuracy: float
    mean_per_class_accuracy: float
    per_class_accuracy: dict[str, float | None]  # by the model's class names, repeats told apart ("missile (2)")
    num_images: int  # images scored
    skipped_images: int  # unreadable images the skip counter first met during this pass

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_split(
    model: torch.nn.Module,
    loader: EvalLoader,
    *,
    accelerator: Accelerator,
    task: str | None = None,
    frozen_features: dict[int, torch.Tensor] | None = None,
) -> SplitMetrics:
    """Score the DPTPeftModel `model` (as `accelerator.prepare` returned it) on the `{"pixel_values", "labels"}`
    batches of `loader`, which counts the unreadable images in `loader.skips`; per-class accuracy is named by the
    model's classes of `task`. `frozen_features`: see `_predict`."""
    skipped_before = len(loader.skips)
    predictions, zero_shot, labels = _predict(model, loader, accelerator, task, frozen_features)
    class_names = accelerator.unwrap_model(model).class_names(task)
    return split_metrics(predictions, zero_shot, labels, class_names, len(loader.skips) - skipped_before)


def split_metrics(
    predictions: np.ndarray, zero_shot: np.ndarray, labels: np.ndarray, class_names: list[str], skipped_images: int
) -> SplitMetrics:
    """The adapter's (`predictions`) and the zero-shot classifier's numbers on one split, per class by name."""
    names = display_names(class_names)
    trained = accuracy_metrics(predictions, labels, len(names))
    frozen = accuracy_metrics(zero_shot, labels, len(names))
    return SplitMetrics(
        zero_shot_accuracy=frozen["accuracy"],
        accuracy=trained["accuracy"],
        zero_shot_mean_per_class_accuracy=frozen["mean_per_class_accuracy"],
        mean_per_class_accuracy=trained["mean_per_class_accuracy"],
        per_class_accuracy=dict(zip(names, trained["per_class_accuracy"])),
        num_images=len(labels),
        skipped_images=skipped_images,
    )


@torch.no_grad()
def _predict(
    model: torch.nn.Module,
    loader: EvalLoader,
    accelerator: Accelerator,
    task: str | None,
    frozen_features: dict[int, torch.Tensor] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The adapter's and the zero-shot model's predictions (same forward), and the labels, of every image.

    `frozen_features` (batch index -> frozen image features) is filled on the first pass and reused by later ones:
    exact for an unshuffled, unaugmented split (the frozen model never changes), one image pass saved per batch.
    """
    model.eval()
    peft_model = accelerator.unwrap_model(model)
    columns: tuple[list, list, list] = ([], [], [])
    batches = tqdm(loader, desc="evaluate", disable=not accelerator.is_local_main_process, leave=False)
    for index, batch in enumerate(batches):
        cached = None
        if frozen_features is not None:
            if index not in frozen_features:
                frozen_features[index] = peft_model.zero_shot_image_features(batch["pixel_values"])
            cached = frozen_features[index]
        output = model(
            pixel_values=batch["pixel_values"], task=task, output_zero_shot_logits=True, zero_shot_image_features=cached
        )
        gathered = accelerator.gather_for_metrics(
            (output.logits.argmax(-1), output.zero_shot_logits.argmax(-1), batch["labels"])
        )
        for column, values in zip(columns, gathered):
            column.append(values.cpu())
    if not columns[0]:
        raise UserInputError("No readable image in the evaluation split; check the dataset and --image_column.")
    predictions, zero_shot, labels = (torch.cat(column).numpy() for column in columns)
    return predictions, zero_shot, labels


def accuracy_metrics(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Through `evaluate`, with the metric module shipped in the package (works offline)."""
    metric = hf_evaluate.load(ACCURACY_PATH)
    return metric.compute(predictions=predictions.tolist(), references=labels.tolist(), num_classes=num_classes)


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


@dataclass(frozen=True)
class EvaluationSpec:
    """What `evaluate` scores: an adapter (on the base model it records, or `model_name_or_path`) on one split."""

    adapter: str
    split: Dataset
    class_names: list[str]  # to prompt with, in label order (repeats kept, as CoOp's lists have them)
    model_name_or_path: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    batch_size: int = 256
    base_to_new: bool = False  # also base and new classes apart; naming either list implies it
    base_classes: list[str] | None = None  # default: CoCoOp's halves
    new_classes: list[str] | None = None
    zero_shot_template: str | None = None  # the dataset's own (transfer targets, as DPT builds its model per dataset)
    adapter_config: DPTConfig | LoraClassifierConfig | None = None  # already checked (`read_adapter_config`)
    zero_shot_ensemble: float | None = None  # weight of the adapter's probabilities, the rest zero-shot's (ensemble.py)

    @property
    def splits_classes(self) -> bool:
        return self.base_to_new or bool(self.base_classes or self.new_classes)


def evaluate_adapter(spec: EvaluationSpec, output_dir: str, *, overwrite_output_dir: bool = False) -> dict:
    """`dpt-peft evaluate`: check `output_dir` before any work (a folder that can be written, no report there that
    dpt_peft did not write, unless `overwrite_output_dir`), evaluate, then write the reports; returns the report."""
    reports = OutputFolder(output_dir)
    reports.check(EVAL_REPORTS, "--overwrite_output_dir", overwrite_output_dir)
    report = evaluate(spec)
    if PartialState().is_main_process:
        write_evaluation_report(report, reports)
    return report


def evaluate(spec: EvaluationSpec) -> dict:
    """The report of `spec`: the adapter's `SplitMetrics` on the split, the images missing from disk, and with
    `spec.splits_classes` base, new and harmonic-mean accuracy ("base_to_new"). The zero-shot template given replaces
    the adapter's for the zero-shot classifier and the CAVPT top-K (a LoRA adapter's classifier prompt). A LoRA
    adapter (`--method lora`) scores any classes, new ones too, through its LoRA'd text encoder."""
    config = spec.adapter_config or read_adapter_config(spec.adapter)
    check_evaluation(spec, config)  # every refusal the adapter and the spec decide, before the model loads
    accelerator = Accelerator()
    model, processor = load_adapted_model(
        spec.adapter, spec.model_name_or_path, device=accelerator.device, config=config
    )
    model = accelerator.prepare(model)
    peft_model = accelerator.unwrap_model(model)
    set_zero_shot_ensemble(peft_model, spec.zero_shot_ensemble)  # loaded for this evaluation only
    split = undecoded(spec.split, spec.image_column)
    batcher = ReportingImageBatcher(processor, spec.image_column, spec.label_column)
    skips = SkipCounter()

    def score(dataset: Dataset, class_names: list[str]) -> SplitMetrics:
        peft_model.set_class_names(class_names, zero_shot_template=spec.zero_shot_template)
        loader = EvalLoader(
            accelerator.prepare(DataLoader(dataset, batch_size=spec.batch_size, collate_fn=batcher)), skips
        )
        return evaluate_split(model, loader, accelerator=accelerator)

    overall = score(split, spec.class_names)
    report = {
        "adapter": str(spec.adapter),
        "zero_shot_template": classifier_template(peft_model),
        "zero_shot_ensemble": ensemble_in_effect(peft_model),
        **overall.to_dict(),
        "missing_images": missing_images(split),
    }
    if spec.splits_classes:
        report["base_to_new"] = _base_to_new(spec, split, score)
    return report


def classifier_template(model: torch.nn.Module) -> str:
    """The template the model's zero-shot classifier (a LoRA classifier's, its only one) prompts with."""
    if isinstance(model, LoraClassifier):
        return model.classifier.template
    return model.peft_config[model.active_adapter].zero_shot_template


def target_template(dataset: str, class_names: list[str], config: DPTConfig | LoraClassifierConfig) -> str | None:
    """The zero-shot template to score `config`'s adapter on `dataset`: a CoOp dataset's own when the adapter learned
    none of its classes (a cross-dataset target, as the benchmark scores one), else None (the adapter's own: its
    dataset, or base-to-new halves of it). A LoRA adapter keeps its own everywhere, as CLIP-LoRA prompts every
    dataset with "a photo of a {}."."""
    if isinstance(config, LoraClassifierConfig):
        return None
    trained = {name for names in config.tasks.values() for name in names}
    spec = COOP_DATASETS.get(dataset)
    return spec.template if spec is not None and not trained & set(class_names) else None


def check_evaluation(spec: EvaluationSpec, config: DPTConfig) -> None:
    """The refusals that the adapter's config and the spec decide, made before the model loads or an image is read:
    the zero-shot template, the class counts a class-specific context can serve, and base-to-new with an adapter
    that was trained on some of the 'new' classes."""
    if spec.zero_shot_template is not None:  # the config's own check names the field
        field = "template" if isinstance(config, LoraClassifierConfig) else "zero_shot_template"
        replace(config, **{field: spec.zero_shot_template})
    trained = [name for names in config.tasks.values() for name in names]
    base, new = (
        base_new_labels(spec.class_names, spec.base_classes, spec.new_classes) if spec.splits_classes else ([], [])
    )
    counts = {len(spec.class_names), *(len(labels) for labels in (base, new) if labels)}
    if isinstance(config, DPTConfig) and config.class_specific_context and counts != {len(trained)}:
        raise UserInputError(
            f"class_specific_context=True learned one context per class for {len(trained)} classes; it cannot serve "
            f"{sorted(counts - {len(trained)})[0]}. Evaluate it on as many classes as it was trained on, without "
            "base/new halves."
        )
    seen = sorted(set(trained) & {spec.class_names[label] for label in new})
    if seen:
        raise UserInputError(
            f"The adapter was trained on {len(seen)} of the 'new' classes (e.g. {seen[0]!r}), so their accuracy "
            "would not measure generalization to unseen classes. Evaluate base-to-new with an adapter trained "
            "on the base classes only (train with --subsample_classes base), or name them with --new_classes."
        )


def _base_to_new(spec: EvaluationSpec, split: Dataset, score: Callable[[Dataset, list[str]], SplitMetrics]) -> dict:
    """Base and new accuracy, each on its classes only (relabelled), and their harmonic mean (CoCoOp)."""
    base, new = base_new_labels(spec.class_names, spec.base_classes, spec.new_classes)
    base_metrics, new_metrics = (
        score(keep_classes(split, labels, spec.label_column), [spec.class_names[label] for label in labels])
        for labels in (base, new)
    )
    shown = display_names(spec.class_names)
    return {
        "base_classes": [shown[label] for label in base],
        "new_classes": [shown[label] for label in new],
        "base_accuracy": base_metrics.accuracy,
        "new_accuracy": new_metrics.accuracy,
        "harmonic_mean": harmonic_mean(base_metrics.accuracy, new_metrics.accuracy),
        "zero_shot_base_accuracy": base_metrics.zero_shot_accuracy,
        "zero_shot_new_accuracy": new_metrics.zero_shot_accuracy,
    }


def write_evaluation_report(report: dict, reports: OutputFolder) -> None:
    """eval_metrics.json and the per-class bar chart, each written atomically and recorded as dpt_peft's."""
    reports.write_json(EVAL_REPORTS[0], report)
    title = f"top-1 {100 * report['accuracy']:.1f}%, mean per class {100 * report['mean_per_class_accuracy']:.1f}%"
    per_class = report["per_class_accuracy"]
    reports.write(
        EVAL_REPORTS[1], lambda path: plot_per_class(list(per_class.values()), list(per_class), str(path), title)
    )
