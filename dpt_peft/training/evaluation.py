"""Evaluation of an adapted CLIP: top-1, mean per-class and base-to-new accuracy, plus a per-class plot."""

from __future__ import annotations

import math

import evaluate
import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..class_names import display_names
from ..data.batching import SKIPPED_KEY, ImageBatcher, SkipCounter, undecoded
from ..data.coop_readers import missing_images
from ..metrics import ACCURACY_PATH
from ..sources import load_adapted_model
from ..utils.plots import plot_per_class
from ..utils.write_policy import OutputFolder

EVAL_REPORTS = ("eval_metrics.json", "per_class_accuracy.png")  # what evaluate writes into its --output_dir


def predict_split(
    model,
    loader: DataLoader,
    accelerator: Accelerator,
    task: str | None = None,
    frozen_features: dict[int, torch.Tensor] | None = None,
    skips: SkipCounter | None = None,
) -> dict:
    """Predictions of the adapter and of plain zero-shot CLIP (same forward) for every image of `loader`.

    `frozen_features` (batch index -> frozen CLIP image features) is filled on the first pass and reused by later
    ones: exact for an unshuffled, unaugmented split (the frozen CLIP never changes), one image pass saved per batch.
    """
    model.eval()
    predictions, zero_shot, labels = [], [], []
    with torch.no_grad():
        batches = tqdm(loader, desc="evaluate", disable=not accelerator.is_local_main_process, leave=False)
        for index, batch in enumerate(batches):
            if batch is not None and SKIPPED_KEY in batch:  # from decoding workers: count each bad image once
                batch = (skips if skips is not None else SkipCounter()).take(batch)
            if batch is None:
                continue
            pixel_values = batch["pixel_values"]
            if frozen_features is not None and index not in frozen_features:
                frozen_features[index] = accelerator.unwrap_model(model).base_model.zero_shot_image_features(
                    pixel_values
                )
            cached = None if frozen_features is None else frozen_features[index]
            output = model(
                pixel_values=pixel_values, task=task, output_zero_shot_logits=True, zero_shot_image_features=cached
            )
            gathered = accelerator.gather_for_metrics(
                (output.logits.argmax(-1), output.zero_shot_logits.argmax(-1), batch["labels"])
            )
            for bucket, values in zip((predictions, zero_shot, labels), gathered):
                bucket.append(values.cpu())
    if not labels:
        raise ValueError("No readable image in the evaluation split; check the dataset and --image_column.")
    return {
        name: torch.cat(values).numpy()
        for name, values in (("predictions", predictions), ("zero_shot_predictions", zero_shot), ("labels", labels))
    }


def accuracy_metrics(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Through `evaluate`, with the metric module shipped in the package (works offline)."""
    metric = evaluate.load(ACCURACY_PATH)
    return metric.compute(predictions=predictions.tolist(), references=labels.tolist(), num_classes=num_classes)


def split_metrics(
    model,
    loader: DataLoader,
    accelerator: Accelerator,
    class_names: list[str],
    task: str | None = None,
    frozen_features: dict[int, torch.Tensor] | None = None,
    skips: SkipCounter | None = None,
) -> dict:
    """The adapter's and zero-shot CLIP's accuracy on one held-out split."""
    result = predict_split(model, loader, accelerator, task=task, frozen_features=frozen_features, skips=skips)
    trained = accuracy_metrics(result["predictions"], result["labels"], len(class_names))
    zero_shot = accuracy_metrics(result["zero_shot_predictions"], result["labels"], len(class_names))
    return {
        "zero_shot_accuracy": zero_shot["accuracy"],
        "accuracy": trained["accuracy"],
        "zero_shot_mean_per_class_accuracy": zero_shot["mean_per_class_accuracy"],
        "mean_per_class_accuracy": trained["mean_per_class_accuracy"],
        "per_class_accuracy": dict(zip(display_names(class_names), trained["per_class_accuracy"])),
        "num_test_images": int(len(result["labels"])),
    }


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def _subset(dataset, label_column: str, keep: list[int]):
    """Images of the classes whose labels are in `keep`, relabelled to positions in `keep`."""
    index = {label: i for i, label in enumerate(keep)}
    subset = dataset.filter(lambda label: label in index, input_columns=label_column)
    return subset.map(lambda label: {label_column: index[label]}, input_columns=label_column)


def base_to_new_classes(
    class_names: list[str], base: list[str] | None, new: list[str] | None
) -> tuple[list[int], list[int]]:
    """The labels of the base and new classes. CoOp's protocol: the first half of the classes (rounded up) are base,
    the rest new, unless named (a repeated name, which CLIP's ImageNet list has, names all its classes)."""
    labels = list(range(len(class_names)))
    if base is None and new is None:
        half = math.ceil(len(class_names) / 2)
        return labels[:half], labels[half:]
    unknown = [name for name in (base or []) + (new or []) if name not in class_names]
    if unknown:
        raise ValueError(f"Class {unknown[0]!r} is not in the dataset's classes {class_names}.")
    if base:
        base_labels = [label for label in labels if class_names[label] in base]
    else:
        base_labels = [label for label in labels if class_names[label] not in (new or [])]
    if new:
        return base_labels, [label for label in labels if class_names[label] in new]
    return base_labels, [label for label in labels if label not in base_labels]


def evaluate_adapter(
    model_name_or_path: str | None,
    adapter: str,
    dataset,
    class_names: list[str],
    image_column: str,
    label_column: str,
    output_dir: str,
    batch_size: int = 256,
    base_classes: list[str] | None = None,
    new_classes: list[str] | None = None,
    base_to_new: bool = False,
    zero_shot_template: str | None = None,
    overwrite_output_dir: bool = False,
) -> dict:
    """Evaluate `adapter` on `dataset`; with `base_to_new`, also base, new and harmonic-mean accuracy.

    `output_dir` is checked before any work (a folder that can be written, no report file there that dpt_peft did
    not write, unless `overwrite_output_dir`); the reports are written atomically and recorded as dpt_peft's.

    `zero_shot_template` is the dataset's own template (cross-dataset and domain-generalization targets, as DPT
    builds its model per dataset); it replaces the adapter's for the zero-shot classifier and the CAVPT top-K.
    Reports tell repeated class names apart ("missile (2)").
    """
    reports = OutputFolder(output_dir)
    reports.check(EVAL_REPORTS, "--overwrite_output_dir", overwrite_output_dir)
    accelerator = Accelerator()
    model, processor = load_adapted_model(adapter, model_name_or_path, device=accelerator.device)
    model = accelerator.prepare(model)
    peft_model = accelerator.unwrap_model(model)
    trained_classes = peft_model.class_names()
    batcher = ImageBatcher(processor, image_column, label_column)
    dataset = undecoded(dataset, image_column)

    def run(split, names: list[str]) -> dict:
        peft_model.set_class_names(names, zero_shot_template=zero_shot_template)
        loader = accelerator.prepare(DataLoader(split, batch_size=batch_size, collate_fn=batcher))
        result = predict_split(model, loader, accelerator)
        metrics = accuracy_metrics(result["predictions"], result["labels"], len(names))
        zero_shot = accuracy_metrics(result["zero_shot_predictions"], result["labels"], len(names))
        metrics["zero_shot_accuracy"] = zero_shot["accuracy"]
        metrics["num_images"] = int(len(result["labels"]))
        return metrics

    overall = run(dataset, class_names)
    shown = display_names(class_names)
    report = {
        "adapter": str(adapter),
        "zero_shot_template": peft_model.peft_config[peft_model.active_adapter].zero_shot_template,
        "accuracy": overall["accuracy"],
        "mean_per_class_accuracy": overall["mean_per_class_accuracy"],
        "zero_shot_accuracy": overall["zero_shot_accuracy"],
        "per_class_accuracy": dict(zip(shown, overall["per_class_accuracy"])),
        "num_images": overall["num_images"],
        "skipped_images": len(batcher.skipped),
        "missing_images": missing_images(dataset),
    }
    if base_to_new or base_classes or new_classes:
        base, new = base_to_new_classes(class_names, base_classes, new_classes)
        seen = sorted(set(trained_classes) & {class_names[label] for label in new})
        if seen:
            raise ValueError(
                f"The adapter was trained on {len(seen)} of the 'new' classes (e.g. {seen[0]!r}), so their accuracy "
                "would not measure generalization to unseen classes. Evaluate base-to-new with an adapter trained "
                "on the base classes only (train with --subsample_classes base), or name them with --new_classes."
            )
        base_metrics = run(_subset(dataset, label_column, base), [class_names[label] for label in base])
        new_metrics = run(_subset(dataset, label_column, new), [class_names[label] for label in new])
        report["base_to_new"] = {
            "base_classes": [shown[label] for label in base],
            "new_classes": [shown[label] for label in new],
            "base_accuracy": base_metrics["accuracy"],
            "new_accuracy": new_metrics["accuracy"],
            "harmonic_mean": harmonic_mean(base_metrics["accuracy"], new_metrics["accuracy"]),
            "zero_shot_base_accuracy": base_metrics["zero_shot_accuracy"],
            "zero_shot_new_accuracy": new_metrics["zero_shot_accuracy"],
        }
    if accelerator.is_main_process:
        reports.write_json(EVAL_REPORTS[0], report)
        title = f"top-1 {100 * report['accuracy']:.1f}%, mean per class {100 * report['mean_per_class_accuracy']:.1f}%"
        per_class = overall["per_class_accuracy"]
        reports.write(EVAL_REPORTS[1], lambda path: plot_per_class(per_class, shown, str(path), title))
    return report
