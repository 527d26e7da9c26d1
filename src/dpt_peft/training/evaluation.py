"""Evaluation of an adapted CLIP: top-1, mean per-class and base-to-new accuracy, plus a per-class plot."""

from __future__ import annotations

from typing import Optional

import evaluate
import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..metrics import ACCURACY_PATH


def predict_split(model, loader: DataLoader, accelerator: Accelerator, task: Optional[str] = None) -> dict:
    """Predictions of the adapter and of plain zero-shot CLIP (same forward) for every image of `loader`."""
    model.eval()
    predictions, zero_shot, labels = [], [], []
    with torch.no_grad():
        for batch in tqdm(loader, desc="evaluate", disable=not accelerator.is_local_main_process, leave=False):
            if batch is None:
                continue
            output = model(pixel_values=batch["pixel_values"], task=task, output_zero_shot_logits=True)
            gathered = accelerator.gather_for_metrics(
                (output.logits.argmax(-1), output.zero_shot_logits.argmax(-1), batch["labels"])
            )
            for bucket, values in zip((predictions, zero_shot, labels), gathered):
                bucket.append(values.cpu())
    if not labels:
        raise ValueError("No readable image in the evaluation split; check the dataset and --image_column.")
    return {name: torch.cat(values).numpy() for name, values in
            (("predictions", predictions), ("zero_shot_predictions", zero_shot), ("labels", labels))}


def accuracy_metrics(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Through `evaluate`, with the metric module shipped in the package (works offline)."""
    metric = evaluate.load(ACCURACY_PATH)
    return metric.compute(predictions=predictions.tolist(), references=labels.tolist(), num_classes=num_classes)


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def plot_per_class(per_class: list[Optional[float]], class_names: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [np.nan if v is None else 100 * v for v in per_class]
    figure, axis = plt.subplots(figsize=(max(4.0, 0.45 * len(class_names) + 1.5), 3.5))
    axis.bar(range(len(values)), values, color="tab:blue")
    axis.set_xticks(range(len(values)), class_names, rotation=60, ha="right", fontsize=8)
    axis.set_ylabel("accuracy (%)")
    axis.set_ylim(0, 100)
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
