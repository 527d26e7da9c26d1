"""The paper's ablation on the embedded default: zero-shot, CoOp, VPT, VPT+CoOp and DPT over several seeds; its runs
run in this process or as jobs (`executors.py`, `--executor`)."""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable
from pathlib import Path

from ..sources import TOY_CLIP_ID
from ..training.arguments import SHIPPED_CONFIG_DEFAULTS
from ..utils.plots import plot_ablation
from ..utils.write_policy import OutputFolder, checked_file
from .executors import ExecutorSpec, execute, train_commands
from .grid import GridRun

METHODS = ("coop", "vpt", "vpt_coop", "dpt")
LABELS = {"zero_shot": "Zero-shot", "coop": "CoOp", "vpt": "VPT", "vpt_coop": "VPT+CoOp", "dpt": "DPT"}


def ablation_runs(
    output_dir: str, seeds: tuple[int, ...], options: dict | None = None, config_options: dict | None = None
) -> list[GridRun]:
    """Every method with every seed (same recipe, same few-shot sets), each in `output_dir`/<method>_seed<seed>."""
    runs = []
    for seed in seeds:
        for method in METHODS:
            run_dir = os.path.join(output_dir, f"{method}_seed{seed}")
            fields = {"method": method, "seed": seed, "output_dir": run_dir, "report_to": "none"}
            runs.append(GridRun.make(run_dir, fields, options or {}, config_options or {}))
    return runs


def run_ablation(
    output_dir: str,
    seeds: tuple[int, ...] = (0, 1, 2),
    options: dict | None = None,
    config_options: dict | None = None,
    executor: ExecutorSpec | None = None,
) -> dict:
    """Train every method with every seed (here, or with `executor`); returns accuracies per method. `options`
    (TrainArguments values) and `config_options` (DPTConfig values) apply to every run; finished runs are read back,
    so an interrupted ablation continues. When runs failed, `GridRunsFailed` holds those that finished
    (`method_results(failed.finished)`)."""
    runs = ablation_runs(output_dir, seeds, options, config_options)
    return method_results(zip(runs, execute(runs, executor or ExecutorSpec(), Path(output_dir))))


def method_results(finished: Iterable[tuple[GridRun, dict]]) -> dict[str, list[float]]:
    """Accuracies per method (zero-shot from the CoOp runs) of finished (run, metrics) pairs."""
    results: dict[str, list[float]] = {"zero_shot": []}
    for run, metrics in finished:
        results.setdefault(run.args.method, []).append(metrics["accuracy"])
        if run.args.method == METHODS[0]:
            results["zero_shot"].append(metrics["zero_shot_accuracy"])
    return {method: values for method, values in results.items() if values}


def ablation_commands(
    output_dir: str, seeds: tuple[int, ...], options: dict | None = None, config_options: dict | None = None
) -> list[str]:
    """`--print_commands`: a `dpt-peft train` command per run not yet trained (its settings written beside)."""
    return train_commands(ablation_runs(output_dir, seeds, options, config_options), Path(output_dir))


def summary_table(results: dict[str, list[float]]) -> str:
    rows = ["| method | mean accuracy (%) | std | per seed (%) |", "|---|---:|---:|---|"]
    for key, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        per_seed = ", ".join(f"{100 * v:.1f}" for v in values)
        rows.append(f"| {LABELS[key]} | {100 * statistics.mean(values):.1f} | {100 * spread:.1f} | {per_seed} |")
    return "\n".join(rows)


def report_paths(output_dir: str, docs_dir: str | None = None) -> tuple[str, str]:
    """results.md and ablation.png: in `docs_dir` when the user names one, else in the ablation's `output_dir`
    (a command writes only under its --output_dir unless told otherwise; results.json goes beside results.md)."""
    folder = docs_dir or output_dir
    return os.path.join(folder, "results.md"), os.path.join(folder, "ablation.png")


def check_report_target(
    markdown_path: str, figure_path: str, overwrite: bool = False, flag: str = "--docs_dir"
) -> None:
    """Before the grid runs: the report files can be written, and none is a file dpt_peft did not write (unless
    `overwrite`, --overwrite_reports: e.g. the repository's own docs/results.md, regenerated on purpose)."""
    json_path = os.path.splitext(markdown_path)[0] + ".json"
    for path in (markdown_path, json_path, figure_path):
        checked_file(path, flag, "--overwrite_reports", overwrite)


def write_report(
    results: dict[str, list[float]],
    markdown_path: str,
    figure_path: str,
    command: str,
    options: dict | None = None,
    config_options: dict | None = None,
) -> None:
    """results.md, results.json and the figure, each written atomically and recorded as dpt_peft's; `options` and
    `config_options` are the flags every run was given (they name the base model and its settings)."""
    base = (options or {}).get("model_name_or_path") or TOY_CLIP_ID
    settings = {**SHIPPED_CONFIG_DEFAULTS.get(base, {}), **(config_options or {})}
    described = ", ".join(f"{name} {value}" for name, value in settings.items())
    figures = OutputFolder(os.path.dirname(figure_path) or ".")
    figures.write(os.path.basename(figure_path), lambda path: plot_ablation(results, LABELS, str(path)))
    figure = os.path.relpath(figure_path, os.path.dirname(markdown_path))
    text = f"""# Ablation on the embedded default

Measured by `{command}` on 2 CPU cores: base model `{base}`, the `toy-position`
task (5 classes, 16 shots per class, the same 600 held-out test images for every seed), the DPT recipe of
docs/method.md section 5 (SGD, 60 epochs, batch 32; VPT+CoOp and DPT with guidance for the first 30 epochs, CoOp and VPT
with plain cross-entropy, as the reference trainers) with these settings: {described or "the paper's"}; no
augmentation on toy tasks. Each seed draws its own training pool and few-shot set; every method
sees the same ones. Zero-shot is the base model with "a photo of a {{class}}.".

{summary_table(results)}

![ablation]({figure})
"""
    reports = OutputFolder(os.path.dirname(markdown_path) or ".")
    reports.write_text(os.path.basename(markdown_path), text)
    reports.write_json(os.path.basename(os.path.splitext(markdown_path)[0] + ".json"), results)
