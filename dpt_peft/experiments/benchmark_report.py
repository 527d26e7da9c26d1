"""The benchmark's numbers computed as CoOp's `parse_test_res.py` and CoCoOp compute them, and written as
results.csv, results.md and the few-shot figure.

- mean and population std (`np.std`) over seeds, and CoOp's 95% confidence interval, 1.96 * std / sqrt(seeds);
- base-to-new: the harmonic mean of the averaged base and new accuracies (CoCoOp), not the mean of per-seed HMs;
- an average over datasets ("average"), and over the targets of a transfer protocol;
- base-to-new opens with zero-shot CLIP (its base, new and HM, as CoCoOp's tables), from the runs' own zero-shot
  scores;
- a cell a method cannot score (a linear probe's new classes, another dataset's classes) is n/a with its reason;
- each row's trainable parameters and training time per run (each run's metrics.json);
- 2 decimals, datasets in the papers' order, the images skipped (unreadable) or missing (listed, not on disk) in
  every row, and the published rows (`published.py`) beside ours, each with its source.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from ..data.catalog import PAPER_ORDER
from ..utils.plots import plot_accuracy_against_shots
from ..utils.write_policy import OutputFolder
from .grid import row_order
from .published import CLIP_LORA_README, DPT_PAPER, published_rows

REPORT_FILES = ("results.csv", "results.md", "accuracy_vs_shots.png")  # in <output_dir>/<protocol>/

AVERAGE = "average"
ZERO_SHOT = "zero_shot"  # the row of the frozen model (base-to-new), from the runs' zero-shot scores
NOT_SCORED = "not_scored"  # in a run's result: metric -> why the method cannot score it (reported as n/a)
COUNTS = ("skipped_images", "missing_images")
COSTS = ("trainable_parameters", "train_seconds")  # per run, from its metrics.json
KEYS = ("protocol", "dataset", "method", "shots", "seed")
COLUMNS = ["protocol", "dataset", "method", "shots", "metric", "mean", "std", "ci95", "seeds", *COUNTS, "note"]
METRICS = {
    "few_shot": ["zero_shot_accuracy", "accuracy"],
    "base_to_new": ["base_accuracy", "new_accuracy", "harmonic_mean"],
}


def paper_order(name: str) -> tuple[int, str]:
    """Sort key: the papers' order, then any other name alphabetically, the average last."""
    if name == AVERAGE:
        return len(PAPER_ORDER) + 1, name
    return (PAPER_ORDER.index(name), name) if name in PAPER_ORDER else (len(PAPER_ORDER), name)


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def _row(protocol: str, key: tuple, metric: str, values: list, counts: dict, note: str | None = None) -> dict:
    """One aggregated cell; n/a (mean None, with `note` saying why) when any seed has no value."""
    dataset, method, shots = key
    head = {"protocol": protocol, "dataset": dataset, "method": method, "shots": shots, "metric": metric}
    if any(value is None for value in values):
        spread = {"mean": None, "std": None, "ci95": None}
        return {**head, **spread, "seeds": len(values), **counts, "note": note or "not scored"}
    std = float(np.std(values))  # population std, as CoOp's parse_test_res.py
    spread = {"mean": float(np.mean(values)), "std": std, "ci95": 1.96 * std / np.sqrt(len(values))}
    return {**head, **spread, "seeds": len(values), **counts, "note": None}


def aggregate(protocol: str, results: list[dict]) -> list[dict]:
    """Mean, population std and 95% CI over seeds of every metric, per (dataset, method, shots), then the average
    over datasets; rows in the papers' dataset order. Skipped and missing images are summed over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for result in results:
        groups.setdefault((result["dataset"], result["method"], result["shots"]), []).append(result)
    if protocol == "base_to_new":
        groups.update(_zero_shot_groups(groups))
    rows = []
    for key in sorted(groups, key=lambda k: (paper_order(k[0]), row_order(k[1]), k[2])):
        members = groups[key]
        counts = {name: sum(m.get(name, 0) for m in members) for name in COUNTS}
        metrics = [name for name in members[0] if name not in (*KEYS, *COUNTS, "harmonic_mean", NOT_SCORED)]
        notes = members[0].get(NOT_SCORED) or {}
        group = [
            _row(protocol, key, metric, [m.get(metric) for m in members], counts, notes.get(metric))
            for metric in metrics
        ]
        targets = [name for name in metrics if name in PAPER_ORDER]
        if targets and protocol in ("cross_dataset", "domain_generalization"):
            values = [[m.get(t) for t in targets] for m in members]
            averages = [None if None in row else float(np.mean(row)) for row in values]
            group.append(_row(protocol, key, AVERAGE, averages, counts, notes.get(targets[0])))
        if protocol == "base_to_new":
            group.append(_cocoop_harmonic_mean(group, key, counts))
        rows += group
    return rows + _average_over_datasets(protocol, rows)


def _zero_shot_groups(groups: dict[tuple, list[dict]]) -> dict[tuple, list[dict]]:
    """Base-to-new's zero-shot rows, per (dataset, shots): the zero-shot base and new accuracies of the first row
    (in the table's order) whose runs all scored both; every run scores the same frozen model on the same images."""
    zero_shot: dict[tuple, list[dict]] = {}
    for dataset, method, shots in sorted(groups, key=lambda k: row_order(k[1])):
        members = groups[(dataset, method, shots)]
        scored = all(m.get("zero_shot_base_accuracy") is not None for m in members) and all(
            m.get("zero_shot_new_accuracy") is not None for m in members
        )
        if scored and (dataset, ZERO_SHOT, shots) not in zero_shot:
            zero_shot[(dataset, ZERO_SHOT, shots)] = [
                {
                    "base_accuracy": m["zero_shot_base_accuracy"],
                    "new_accuracy": m["zero_shot_new_accuracy"],
                    "trainable_parameters": 0,
                    **{name: m.get(name, 0) for name in COUNTS},
                }
                for m in members
            ]
    return zero_shot


def _cocoop_harmonic_mean(rows: list[dict], key: tuple, counts: dict) -> dict:
    """CoCoOp's HM: of the averaged base and new accuracies (no spread: it is not averaged over seeds); n/a when
    either is."""
    by_metric = {row["metric"]: row for row in rows}
    base, new = by_metric["base_accuracy"], by_metric["new_accuracy"]
    dataset, method, shots = key
    missing = next((row for row in (base, new) if row["mean"] is None), None)
    value = None if missing else harmonic_mean(base["mean"], new["mean"])
    return {
        **{"protocol": "base_to_new", "dataset": dataset, "method": method, "shots": shots},
        **{"metric": "harmonic_mean", "mean": value},
        **{"std": None, "ci95": None, "seeds": rows[0]["seeds"], **counts},
        "note": missing["note"] if missing else None,
    }


def _average_over_datasets(protocol: str, rows: list[dict]) -> list[dict]:
    """The papers' headline: per (method, shots, metric), the mean over datasets of the per-dataset means (HM of
    the averaged base and new for base-to-new); only where every one of several datasets has the metric."""
    by_key: dict[tuple, list[dict]] = {}
    for row in rows:
        by_key.setdefault((row["method"], row["shots"], row["metric"]), []).append(row)
    datasets = len({row["dataset"] for row in rows})
    averages = []
    for (method, shots, metric), members in by_key.items():
        if datasets < 2 or len(members) != datasets or metric == "harmonic_mean":
            continue
        missing = next((m for m in members if m["mean"] is None), None)
        averages.append(
            {
                **{"protocol": protocol, "dataset": AVERAGE, "method": method, "shots": shots, "metric": metric},
                **{"mean": None if missing else float(np.mean([m["mean"] for m in members]))},
                **{"std": None, "ci95": None, "seeds": min(m["seeds"] for m in members)},
                **{name: sum(m[name] for m in members) for name in COUNTS},
                "note": missing["note"] if missing else None,
            }
        )
    if protocol == "base_to_new":
        pairs: dict[tuple, dict[str, dict]] = {}
        for row in averages:
            pairs.setdefault((row["method"], row["shots"]), {})[row["metric"]] = row
        for (method, shots), pair in pairs.items():
            if "base_accuracy" in pair and "new_accuracy" in pair:
                counts = {name: pair["base_accuracy"][name] for name in COUNTS}
                averages.append(_cocoop_harmonic_mean(list(pair.values()), (AVERAGE, method, shots), counts))
    return averages


def check_report_target(protocol: str, output_dir: str, overwrite: bool = False) -> None:
    """Before the grid runs: the report files can be written, and none there is a file dpt_peft did not write
    (unless `overwrite`, --overwrite_reports)."""
    OutputFolder(Path(output_dir) / protocol).check(REPORT_FILES, "--overwrite_reports", overwrite)


def write_report(protocol: str, rows: list[dict], output_dir: str, confidence_interval: bool = False) -> Path:
    """results.csv, results.md (with the published rows) and, for few-shot, accuracy against shots (PNG), each
    written atomically and recorded as dpt_peft's (`utils/write_policy.py`)."""
    folder = OutputFolder(Path(output_dir) / protocol)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    folder.write_text(REPORT_FILES[0], table.getvalue())
    spread = "population std" + (" [95% confidence interval]" if confidence_interval else "")
    lines = [f"# {protocol.replace('_', ' ')}: mean ± {spread} over seeds (accuracy, %)", ""]
    lines += markdown_table(protocol, rows, confidence_interval)
    lines += not_scored_notes(rows)
    lines += ["", *published_table(protocol, rows)]
    if protocol == "few_shot":
        folder.write(REPORT_FILES[2], lambda path: plot_accuracy_against_shots(rows, str(path)))
        lines += ["", f"![accuracy against shots]({REPORT_FILES[2]})"]
    return folder.write_text(REPORT_FILES[1], "\n".join(lines) + "\n")


def _cell(row: dict | None, confidence_interval: bool) -> str:
    if row is None:
        return "-"
    if row["mean"] is None:  # the method cannot score it: why is under the table
        return "n/a"
    if row["std"] is None:  # an average over datasets, or CoCoOp's HM of averages
        return f"{100 * row['mean']:.2f}"
    ci = f" [± {100 * row['ci95']:.2f}]" if confidence_interval else ""
    return f"{100 * row['mean']:.2f} ± {100 * row['std']:.2f}{ci}"


def _metrics(protocol: str, rows: list[dict]) -> list[str]:
    found = {r["metric"] for r in rows} - set(COSTS)
    if protocol in METRICS:
        return METRICS[protocol]
    return sorted(found, key=lambda m: (m != "source_accuracy", paper_order(m)))


def markdown_table(protocol: str, rows: list[dict], confidence_interval: bool = False) -> list[str]:
    """One line per (dataset, method, shots) in the papers' order, one column per metric, then the images
    skipped (unreadable) and missing (listed, not on disk) over all seeds."""
    index = {(r["dataset"], r["method"], r["shots"], r["metric"]): r for r in rows}
    keys = list(dict.fromkeys((r["dataset"], r["method"], r["shots"]) for r in rows))
    metrics = _metrics(protocol, rows)
    datasets = len({r["dataset"] for r in rows} - {AVERAGE})
    header = " | ".join(m.replace("_", " ") for m in metrics)
    lines = [
        f"| dataset | method | shots | {header} | trainable parameters | train time per run (s) | skipped | missing |",
        "|---|---|---:|" + "---:|" * (len(metrics) + 4),
    ]
    for dataset, method, shots in keys:
        cells = " | ".join(_cell(index.get((dataset, method, shots, m)), confidence_interval) for m in metrics)
        parameters, seconds = (index.get((dataset, method, shots, cost)) for cost in COSTS)
        costs = f"{_count(parameters, '{:,.0f}')} | {_count(seconds, '{:.1f}')}"
        first = next(r for r in rows if (r["dataset"], r["method"], r["shots"]) == (dataset, method, shots))
        name = f"**average of {datasets} datasets**" if dataset == AVERAGE else dataset
        shown = "zero-shot CLIP" if method == ZERO_SHOT else method
        lines.append(
            f"| {name} | {shown} | {shots} | {cells} | {costs} | {first['skipped_images']} | "
            f"{first['missing_images']} |"
        )
    return lines


def _count(row: dict | None, form: str) -> str:
    """A cost cell: its mean over seeds (and datasets for the average), or - when the runs did not record it."""
    return "-" if row is None or row["mean"] is None else form.format(row["mean"])


def not_scored_notes(rows: list[dict]) -> list[str]:
    """Under the table: why each n/a cell is one, once per (method, reason)."""
    reasons = dict.fromkeys((r["method"], r["note"]) for r in rows if r["mean"] is None and r["metric"] not in COSTS)
    if not reasons:
        return []
    return ["", *(f"n/a ({method}): {note}." for method, note in reasons)]


def published_table(protocol: str, rows: list[dict]) -> list[str]:
    """The published rows for the datasets we report, each with its source; the DPT paper's cell says why it is
    empty."""
    metrics = _metrics(protocol, rows)
    datasets = sorted({r["dataset"] for r in rows}, key=paper_order)
    published = sorted(published_rows(protocol, datasets), key=lambda row: paper_order(row.dataset))
    lines = [
        "## Published (not our runs: for comparison, each with its source)",
        "",
        f"| dataset | method | {' | '.join(m.replace('_', ' ') for m in metrics)} | source |",
        "|---|---|" + "---:|" * len(metrics) + "---|",
    ]
    for row in published:
        cells = " | ".join(f"{row.metrics[m]:.2f}" if m in row.metrics else "-" for m in metrics)
        lines.append(f"| {row.dataset} | {row.method} | {cells} | {row.source} |")
    empty = " | ".join("" for _ in metrics)
    lines.append(f"| all | DPT (the paper) | {empty} | {DPT_PAPER} |")
    if protocol == "few_shot":
        lines.append(f"| all | CLIP-LoRA | {empty} | {CLIP_LORA_README} |")
    return lines
