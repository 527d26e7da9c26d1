"""Every figure the project writes as PNG: training curves, per-class accuracy, the ablation, attention maps.

Matplotlib is imported inside each function with the Agg backend, so importing dpt_peft never needs a display.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from PIL import Image


class ClassAttention(Protocol):
    """One class's attention over the patch grid, as `integrations.visualize.AttentionMap` holds it (utils, a leaf,
    imports nothing above it)."""

    class_name: str
    layer: int
    weights: torch.Tensor  # [grid_h, grid_w]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curve(history: list[dict], path: str) -> None:
    """Loss, training accuracy and (when validated) validation accuracy per epoch; guidance epochs are shaded."""
    plt = _pyplot()
    epochs = [h["epoch"] + 1 for h in history]
    figure, loss_axis = plt.subplots(figsize=(6, 3.5))
    loss_axis.plot(epochs, [h["loss"] for h in history], color="tab:red", label="loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss", color="tab:red")
    accuracy_axis = loss_axis.twinx()
    accuracy_axis.plot(epochs, [100 * h["train_accuracy"] for h in history], color="tab:blue", label="train accuracy")
    validated = [h for h in history if h.get("val_accuracy") is not None]
    if validated:  # held-out accuracy (the few-shot validation split) next to the training curve
        accuracy_axis.plot(
            [h["epoch"] + 1 for h in validated],
            [100 * h["val_accuracy"] for h in validated],
            color="tab:green",
            marker="o",
            label="validation accuracy",
        )
        accuracy_axis.legend(loc="lower right", fontsize=8)
    accuracy_axis.set_ylabel("accuracy (%)", color="tab:blue")
    accuracy_axis.set_ylim(0, 100)
    guided = [h["epoch"] + 1 for h in history if h["guidance"]]
    if guided:
        loss_axis.axvspan(min(guided) - 0.5, max(guided) + 0.5, color="0.9", zorder=0, label="guidance")
    figure.suptitle("DPT training (shaded: general-knowledge guidance epochs)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_per_class(per_class: list[float | None], class_names: list[str], path: str, title: str) -> None:
    plt = _pyplot()
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


def plot_ablation(results: dict[str, list[float]], labels: dict[str, str], path: str) -> None:
    """Mean test accuracy per method with the spread over seeds."""
    plt = _pyplot()
    names = [labels[k] for k in results]
    means = [100 * statistics.mean(v) for v in results.values()]
    spreads = [100 * statistics.stdev(v) if len(v) > 1 else 0.0 for v in results.values()]
    figure, axis = plt.subplots(figsize=(max(6.0, 1.2 * len(names)), 3.5))  # room for every row's label
    axis.bar(names, means, yerr=spreads, capsize=4, color=["0.6", "tab:blue", "tab:orange", "tab:green", "tab:red"])
    for x, (mean, spread) in enumerate(zip(means, spreads)):
        axis.text(x, mean + spread + 1.5, f"{mean:.1f}", ha="center", fontsize=9)
    axis.set_ylabel("test accuracy (%)")
    axis.set_ylim(0, 105)
    axis.set_title(f"Embedded default (toy-position), mean ± std over {len(next(iter(results.values())))} seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_accuracy_against_shots(rows: list[dict], path: str) -> None:
    """The paper's few-shot figure: per dataset, in the order of `rows` (the papers', the average last), mean test
    accuracy against shots, one line per method (error bars: std over seeds, none for the average), zero-shot CLIP
    dashed."""
    plt = _pyplot()
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    columns = min(4, len(datasets))
    figure, axes = plt.subplots(
        math.ceil(len(datasets) / columns),
        columns,
        figsize=(3.2 * columns, 2.8 * math.ceil(len(datasets) / columns)),
        squeeze=False,
    )
    for axis, dataset in zip(axes.flat, datasets):
        mine = [r for r in rows if r["dataset"] == dataset]
        for method in sorted({r["method"] for r in mine}):
            points = sorted(
                (r["shots"], r["mean"], r["std"]) for r in mine if r["method"] == method and r["metric"] == "accuracy"
            )
            shots, means, stds = zip(*points)
            axis.errorbar(
                shots,
                [100 * m for m in means],
                yerr=[100 * (s or 0.0) for s in stds],
                marker="o",
                capsize=3,
                label=method,
            )
        zero_shot = [r["mean"] for r in mine if r["metric"] == "zero_shot_accuracy"]
        if zero_shot:
            axis.axhline(100 * statistics.mean(zero_shot), color="0.5", linestyle="--", label="zero-shot")
        axis.set_xscale("log", base=2)
        axis.set_title(f"average over {len(datasets) - 1} datasets" if dataset == "average" else dataset, fontsize=9)
        axis.set_xlabel("shots per class")
        axis.set_ylabel("accuracy (%)")
    for axis in list(axes.flat)[len(datasets) :]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def save_attention_figure(image: Image.Image, maps: list[ClassAttention], path: str, title: str = "") -> None:
    """The image, then each class's attention upsampled onto it, side by side."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(maps) + 1, figsize=(2.6 * (len(maps) + 1), 2.9))
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    for axis, attention in zip(axes[1:], maps):
        upsampled = F.interpolate(
            attention.weights[None, None], size=image.size[::-1], mode="bilinear", align_corners=False
        )[0, 0]
        axis.imshow(image)
        axis.imshow(upsampled.numpy(), cmap="jet", alpha=0.5)
        axis.set_title(f"{attention.class_name} (layer {attention.layer})", fontsize=9)
    for axis in axes:
        axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
