"""The paper's ablation on the embedded default: zero-shot, CoOp, VPT, VPT+CoOp and DPT over several seeds."""

from __future__ import annotations

import json
import os
import statistics

from ..training.arguments import parse_args
from ..training.checkpoints import continue_flags
from ..training.trainer import train
from ..utils.plots import plot_ablation

METHODS = ("coop", "vpt", "vpt_coop", "dpt")
LABELS = {"zero_shot": "Zero-shot CLIP", "coop": "CoOp", "vpt": "VPT", "vpt_coop": "VPT+CoOp", "dpt": "DPT"}


def run_ablation(output_dir: str, seeds: tuple[int, ...] = (0, 1, 2), extra: list[str] | None = None) -> dict:
    """Train every method with every seed (same recipe, same few-shot sets); returns accuracies per method."""
    results: dict[str, list[float]] = {"zero_shot": []}
    for seed in seeds:
        for method in METHODS:
            run_dir = os.path.join(output_dir, f"{method}_seed{seed}")
            metrics_file = os.path.join(run_dir, "metrics.json")
            if os.path.exists(metrics_file):  # finished earlier: an interrupted ablation continues
                with open(metrics_file) as f:
                    metrics = json.load(f)
            else:
                argv = ["--method", method, "--seed", str(seed), "--output_dir", run_dir, "--report_to", "none"]
                args, overrides = parse_args([*argv, *(extra or []), *continue_flags(run_dir)])
                metrics = train(args, overrides)
            results.setdefault(method, []).append(metrics["accuracy"])
            if method == METHODS[0]:
                results["zero_shot"].append(metrics["zero_shot_accuracy"])
    return results


def summary_table(results: dict[str, list[float]]) -> str:
    rows = ["| method | mean accuracy (%) | std | per seed (%) |", "|---|---:|---:|---|"]
    for key, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        per_seed = ", ".join(f"{100 * v:.1f}" for v in values)
        rows.append(f"| {LABELS[key]} | {100 * statistics.mean(values):.1f} | {100 * spread:.1f} | {per_seed} |")
    return "\n".join(rows)


def write_report(results: dict[str, list[float]], markdown_path: str, figure_path: str, command: str) -> None:
    plot_ablation(results, LABELS, figure_path)
    figure = os.path.relpath(figure_path, os.path.dirname(markdown_path))
    text = f"""# Ablation on the embedded default

Measured by `{command}` on 2 CPU cores: the toy CLIP shipped in `dpt_peft/toy/assets`, the `toy-position`
task (5 classes, 16 shots per class, 600 held-out test images per seed), the DPT recipe of docs/method.md
section 5 (SGD, 60 epochs, batch 32; VPT+CoOp and DPT with guidance for the first 30 epochs, CoOp and VPT
with plain cross-entropy, as the reference trainers) with the two toy settings
(4 context tokens, no augmentation). Each seed draws its own toy datasets and few-shot set; every method
sees the same ones. Zero-shot is plain CLIP with "a photo of a {{class}}.".

{summary_table(results)}

![ablation]({figure})
"""
    with open(markdown_path, "w") as f:
        f.write(text)
    with open(os.path.splitext(markdown_path)[0] + ".json", "w") as f:
        json.dump(results, f, indent=2)
