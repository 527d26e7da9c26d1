"""Evaluation of an adapted CLIP: top-1, mean per-class and base-to-new accuracy, plus a per-class plot."""

from __future__ import annotations

import json
import math
import os

import evaluate
import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.datasets import ImageBatcher, undecoded
from ..data.input_pipeline import SKIPPED_KEY, SkipCounter
from ..metrics import ACCURACY_PATH
from ..sources import load_adapted_model
from ..utils.plots import plot_per_class


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
        "per_class_accuracy": dict(zip(class_names, trained["per_class_accuracy"])),
        "num_test_images": int(len(result["labels"])),
    }


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def _subset(dataset, label_column: str, class_names: list[str], keep: list[str]):
    """Images of the classes in `keep`, relabelled to indices into `keep`."""
    unknown = [name for name in keep if name not in class_names]
    if unknown:
        raise ValueError(f"Class {unknown[0]!r} is not in the dataset's classes {class_names}.")
    index = {class_names.index(name): i for i, name in enumerate(keep)}
    subset = dataset.filter(lambda label: label in index, input_columns=label_column)
    return subset.map(lambda label: {label_column: index[label]}, input_columns=label_column)


def base_to_new_classes(class_names: list[str], base: list[str] | None, new: list[str] | None):
    """CoOp's protocol: the first half of the classes (rounded up) are base, the rest new, unless given."""
    if base is None and new is None:
        half = math.ceil(len(class_names) / 2)
        return class_names[:half], class_names[half:]
    base = base or [n for n in class_names if n not in (new or [])]
    new = new or [n for n in class_names if n not in base]
    return base, new


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
) -> dict:
    """Evaluate `adapter` on `dataset`; with `base_to_new`, also base, new and harmonic-mean accuracy."""
    accelerator = Accelerator()
    model, processor = load_adapted_model(adapter, model_name_or_path, device=accelerator.device)
    model = accelerator.prepare(model)
    peft_model = accelerator.unwrap_model(model)
    trained_classes = peft_model.class_names()
    batcher = ImageBatcher(processor, image_column, label_column)
    dataset = undecoded(dataset, image_column)

    def run(split, names: list[str]) -> dict:
        peft_model.set_class_names(names)
        loader = accelerator.prepare(DataLoader(split, batch_size=batch_size, collate_fn=batcher))
        result = predict_split(model, loader, accelerator)
        metrics = accuracy_metrics(result["predictions"], result["labels"], len(names))
        zero_shot = accuracy_metrics(result["zero_shot_predictions"], result["labels"], len(names))
        metrics["zero_shot_accuracy"] = zero_shot["accuracy"]
        metrics["num_images"] = int(len(result["labels"]))
        return metrics

    overall = run(dataset, class_names)
    report = {
        "adapter": str(adapter),
        "accuracy": overall["accuracy"],
        "mean_per_class_accuracy": overall["mean_per_class_accuracy"],
        "zero_shot_accuracy": overall["zero_shot_accuracy"],
        "per_class_accuracy": dict(zip(class_names, overall["per_class_accuracy"])),
        "num_images": overall["num_images"],
        "skipped_images": len(batcher.skipped),
    }
    if base_to_new or base_classes or new_classes:
        base, new = base_to_new_classes(class_names, base_classes, new_classes)
        seen = sorted(set(trained_classes) & set(new))
        if seen:
            raise ValueError(
                f"The adapter was trained on {len(seen)} of the 'new' classes (e.g. {seen[0]!r}), so their accuracy "
                "would not measure generalization to unseen classes. Evaluate base-to-new with an adapter trained "
                "on the base classes only (train with --subsample_classes base), or name them with --new_classes."
            )
        base_metrics = run(_subset(dataset, label_column, class_names, base), base)
        new_metrics = run(_subset(dataset, label_column, class_names, new), new)
        report["base_to_new"] = {
            "base_classes": base,
            "new_classes": new,
            "base_accuracy": base_metrics["accuracy"],
            "new_accuracy": new_metrics["accuracy"],
            "harmonic_mean": harmonic_mean(base_metrics["accuracy"], new_metrics["accuracy"]),
            "zero_shot_base_accuracy": base_metrics["zero_shot_accuracy"],
            "zero_shot_new_accuracy": new_metrics["zero_shot_accuracy"],
        }
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "eval_metrics.json"), "w") as f:
            json.dump(report, f, indent=2)
        plot_per_class(
            overall["per_class_accuracy"],
            class_names,
            os.path.join(output_dir, "per_class_accuracy.png"),
            f"top-1 {100 * report['accuracy']:.1f}%, mean per class {100 * report['mean_per_class_accuracy']:.1f}%",
        )
    return report
