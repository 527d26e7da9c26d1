"""The ablation on the embedded default: zero-shot, the linear probe, CoOp, VPT, VPT+CoOp, DPT and LoRA (and any
named variant: a row whose runs get its own train flags) over several seeds, with each row's trainable parameters
and training time; its runs run in this process or as jobs (`executors.py`, `--executor`)."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..sources import TOY_CLIP_ID
from ..training.arguments import SHIPPED_CONFIG_DEFAULTS
from ..utils.plots import plot_ablation
from ..utils.write_policy import OutputFolder, checked_file
from .executors import ExecutorSpec, execute, train_commands
from .grid import METHOD_ORDER, TRAIN_METHODS, GridRun, Variant, check_grid_options, check_variants, row_order

LABELS = {
    "zero_shot": "Zero-shot",
    "linear_probe": "Linear probe",
    "coop": "CoOp",
    "vpt": "VPT",
    "vpt_coop": "VPT+CoOp",
    "dpt": "DPT",
    "lora": "LoRA",
}
# Every method train takes, in the table's order (LoRA once `--method lora` exists).
METHODS = tuple(method for method in METHOD_ORDER if method in TRAIN_METHODS)
COST_KEYS = ("trainable_parameters", "train_seconds")


def ablation_variants(methods: Sequence[str] = METHODS, variants: Sequence[Variant] | None = None) -> list[Variant]:
    """The ablation's rows: one per method, then the named variants; checked."""
    rows = [Variant.of_method(method) for method in methods] + list(variants or ())
    check_variants(rows)
    return rows


def ablation_runs(
    output_dir: str,
    seeds: tuple[int, ...],
    options: dict | None = None,
    config_options: dict | None = None,
    variants: Sequence[Variant] | None = None,
) -> list[GridRun]:
    """Every row with every seed (same recipe, same few-shot sets), each in `output_dir`/<row>_seed<seed>."""
    check_grid_options(options or {})
    runs = []
    for seed in seeds:
        for variant in variants if variants is not None else ablation_variants():
            run_dir = os.path.join(output_dir, f"{variant.name}_seed{seed}")
            fields = {"method": variant.method, "seed": seed, "output_dir": run_dir, "report_to": "none"}
            run_options, run_config = variant.run_options(options or {}, config_options or {})
            runs.append(GridRun.make(variant.name, fields, run_options, run_config))
    return runs


def run_ablation(
    output_dir: str,
    seeds: tuple[int, ...] = (0, 1, 2),
    options: dict | None = None,
    config_options: dict | None = None,
    executor: ExecutorSpec | None = None,
    variants: Sequence[Variant] | None = None,
) -> AblationResults:
    """Train every row with every seed (here, or with `executor`); returns accuracies and costs per row. `options`
    (TrainArguments values) and `config_options` (DPTConfig values) apply to every run, a variant's own flags on
    top; finished runs are read back, so an interrupted ablation continues. When runs failed, `GridRunsFailed` holds
    those that finished (`method_results(failed.finished)`)."""
    runs = ablation_runs(output_dir, seeds, options, config_options, variants)
    return method_results(zip(runs, execute(runs, executor or ExecutorSpec(), Path(output_dir))))


@dataclass
class AblationResults:
    """Per row (zero-shot first): test accuracies, one per seed, and each run's costs (`COST_KEYS`, from its
    metrics.json)."""

    accuracies: dict[str, list[float]]
    costs: dict[str, dict[str, list[float]]]


def method_results(finished: Iterable[tuple[GridRun, dict]]) -> AblationResults:
    """Accuracies and costs per row of finished (run, metrics) pairs. Zero-shot is each seed's first run's (every
    run of a seed scores the same frozen model on the same test images)."""
    accuracies: dict[str, list[float]] = {"zero_shot": []}
    costs: dict[str, dict[str, list[float]]] = {}
    seeds_with_zero_shot = set()
    for run, metrics in finished:
        accuracies.setdefault(run.label, []).append(metrics["accuracy"])
        for key in COST_KEYS:
            costs.setdefault(run.label, {}).setdefault(key, []).append(metrics.get(key))
        if run.args.seed not in seeds_with_zero_shot and metrics.get("zero_shot_accuracy") is not None:
            seeds_with_zero_shot.add(run.args.seed)
            accuracies["zero_shot"].append(metrics["zero_shot_accuracy"])
    return AblationResults({name: values for name, values in accuracies.items() if values}, costs)


def ablation_commands(
    output_dir: str,
    seeds: tuple[int, ...],
    options: dict | None = None,
    config_options: dict | None = None,
    variants: Sequence[Variant] | None = None,
) -> list[str]:
    """`--print_commands`: a `dpt-peft train` command per run not yet trained (its settings written beside)."""
    return train_commands(ablation_runs(output_dir, seeds, options, config_options, variants), Path(output_dir))


def summary_table(results: dict[str, list[float]], costs: dict[str, dict[str, list]] | None = None) -> str:
    """Mean, std (sample, over seeds) and per-seed accuracy of each row, with its trainable parameters and mean
    training time per run; rows in the table's order."""
    rows = [
        "| method | mean accuracy (%) | std | per seed (%) | trainable parameters | train time per run (s) |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for key in sorted(results, key=row_order_of(results)):
        values = results[key]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        per_seed = ", ".join(f"{100 * v:.1f}" for v in values)
        parameters, seconds = _costs(key, (costs or {}).get(key, {}))
        rows.append(
            f"| {LABELS.get(key, key)} | {100 * statistics.mean(values):.1f} | {100 * spread:.1f} | {per_seed} | "
            f"{parameters} | {seconds} |"
        )
    return "\n".join(rows)


def row_order_of(results: dict) -> Callable[[str], tuple]:
    """Zero-shot, the methods in their order, then the variants as they came."""
    given = [Variant(name) for name in results]
    return lambda name: row_order(name, given)


def _costs(key: str, costs: dict[str, list]) -> tuple[str, str]:
    """The table's cost cells: 0 and - for zero-shot; the parameters (a range when seeds differ), the mean time."""
    if key == "zero_shot":
        return "0", "-"
    parameters = sorted({int(p) for p in costs.get("trainable_parameters", []) if p is not None})
    seconds = [s for s in costs.get("train_seconds", []) if s is not None]
    shown = "-" if not parameters else f"{parameters[0]:,}" + (f"-{parameters[-1]:,}" if len(parameters) > 1 else "")
    return shown, f"{statistics.mean(seconds):.1f}" if seconds else "-"


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
    costs: dict[str, dict[str, list]] | None = None,
    variants: Sequence[Variant] = (),
) -> None:
    """results.md, results.json (the accuracies per row and seed) and the figure, each written atomically and
    recorded as dpt_peft's; `options` and `config_options` are the flags every run was given (they name the base
    model and its settings), `costs` each row's `COST_KEYS` per run, `variants` the rows named by --variant."""
    base = (options or {}).get("model_name_or_path") or TOY_CLIP_ID
    settings = {**SHIPPED_CONFIG_DEFAULTS.get(base, {}), **(config_options or {})}
    described = ", ".join(f"{name} {value}" for name, value in settings.items())
    ordered = {name: results[name] for name in sorted(results, key=row_order_of(results))}
    labels = {name: LABELS.get(name, name) for name in ordered}
    figures = OutputFolder(os.path.dirname(figure_path) or ".")
    figures.write(os.path.basename(figure_path), lambda path: plot_ablation(ordered, labels, str(path)))
    figure = os.path.relpath(figure_path, os.path.dirname(markdown_path))
    named = "".join(
        f"\n- {variant.name}: `{variant.flags}`"
        for variant in variants
        if variant.name in results and variant != Variant.of_method(variant.name)  # a --variant, not a --methods row
    )
    variants_text = f"\n\nVariants (the train flags of their runs):{named}" if named else ""
    text = f"""# Ablation on the embedded default

Measured by `{command}` on {machine()}: base model `{base}`, the `toy-position`
task (5 classes, 16 shots per class, the same 600 held-out test images for every seed), the DPT recipe of
docs/method.md section 5 (SGD, 60 epochs, batch 32; VPT+CoOp and DPT with guidance for the first 30 epochs, CoOp and VPT
with plain cross-entropy, as the reference trainers) with these settings: {described or "the paper's"}; no
augmentation on toy tasks. Each seed draws its own training pool and few-shot set; every method
sees the same ones. Zero-shot is the base model with "a photo of a {{class}}.". The linear probe is CoOp's
logistic regression on the frozen image features (`--method linear_probe`: C searched on the few-shot validation
images, min(shots, 4) per class), LoRA CLIP-LoRA's recipe (`--method lora`). Trainable parameters and the training
time per run come from each run's metrics.json (`train_seconds`: the training loop; for the linear probe, its
training and validation features and the search of C).{variants_text}

{summary_table(ordered, costs)}

![ablation]({figure})
"""
    reports = OutputFolder(os.path.dirname(markdown_path) or ".")
    reports.write_text(os.path.basename(markdown_path), text)
    reports.write_json(os.path.basename(os.path.splitext(markdown_path)[0] + ".json"), ordered)


def machine() -> str:
    """Where the runs ran, as the report says it: the GPU's name, else the CPU cores this process may use."""
    if torch.cuda.is_available():
        return f"one {torch.cuda.get_device_name(0)}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} CPU cores"
