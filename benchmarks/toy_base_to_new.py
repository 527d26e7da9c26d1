"""Base-to-new on the toy (docs/results.md): each row trained on the base classes of `BASE_TO_NEW_TASK`, then scored
by `dpt-peft evaluate --base_to_new` on the base and the new classes, over seeds, aggregated as the benchmark runner
aggregates (`experiments.benchmark_report.aggregate`: mean and population std over seeds, CoCoOp's HM of the averaged
base and new accuracies, a zero-shot CLIP row first).

    python benchmarks/toy_base_to_new.py OUTPUT_DIR [--seeds 1 2 3] [--rows coop dpt ...]

A row's finished runs are reused (`dpt-peft train` refuses a folder of another run), so a killed script continues.
Writes OUTPUT_DIR/results.json (every run's numbers and the aggregate) and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dpt_peft.cli import main as dpt_peft
from dpt_peft.experiments.benchmark_report import aggregate
from dpt_peft.toy.tasks import BASE_TO_NEW_TASK
from dpt_peft.utils.write_policy import OutputFolder

CONSISTENCY = ["--consistency_weights", "10", "25", "1"]
ROWS = {
    "coop": ["--method", "coop"],
    "dpt": ["--method", "dpt"],
    "dpt_consistency": ["--method", "dpt", *CONSISTENCY],
    "dpt_consistency_gpa": ["--method", "dpt", *CONSISTENCY, "--prompt_averaging", "gaussian"],
    "dpt_ensemble": ["--method", "dpt", "--zero_shot_ensemble", "0.5"],
    "dpt_consistency_ensemble": ["--method", "dpt", *CONSISTENCY, "--zero_shot_ensemble", "0.5"],
    "dpt_consistency_text_init": ["--method", "dpt", *CONSISTENCY, "--text_init", "a photo of a"],
    "coop_consistency": ["--method", "coop", *CONSISTENCY],
    "lora": ["--method", "lora"],
}


def run(output_dir: Path, row: str, seed: int) -> dict:
    """Train one row's seed on the base classes (reused when finished) and score it on base and new."""
    run_dir = output_dir / f"{row}_seed{seed}"
    if not (run_dir / "train" / "metrics.json").is_file():
        flags = ["--dataset", BASE_TO_NEW_TASK, "--seed", str(seed), "--subsample_classes", "base"]
        dpt_peft(["train", *flags, *ROWS[row], "--report_to", "none", "--output_dir", str(run_dir / "train")])
    report = run_dir / "eval" / "eval_metrics.json"
    if not report.is_file():
        dpt_peft(
            ["evaluate", "--adapter", str(run_dir / "train" / "adapter"), "--dataset", BASE_TO_NEW_TASK]
            + ["--base_to_new", "--output_dir", str(run_dir / "eval")]
        )
    scores = json.loads(report.read_text())["base_to_new"]
    trained = json.loads((run_dir / "train" / "metrics.json").read_text())
    return {
        "dataset": BASE_TO_NEW_TASK,
        "method": row,
        "shots": 16,
        "seed": seed,
        **{
            key: scores[key]
            for key in ("base_accuracy", "new_accuracy", "zero_shot_base_accuracy", "zero_shot_new_accuracy")
        },
        "trainable_parameters": trained["trainable_parameters"],
        "train_seconds": trained["train_seconds"],
    }


def cell(metrics: dict[str, dict], metric: str) -> str:
    """`mean ± std` in %, the std left out where there is none (HM, the zero-shot row)."""
    found = metrics[metric]
    spread = f" ± {100 * found['std']:.2f}" if (found.get("std") or 0) >= 5e-5 else ""
    return f"{100 * found['mean']:.2f}{spread}"


def markdown(rows: list[dict], results: list[dict]) -> str:
    """The table: base, new (mean ± std, in %), HM, and per seed base / new."""
    cells: dict[str, dict[str, dict]] = {}
    for row in rows:
        cells.setdefault(row["method"], {})[row["metric"]] = row
    lines = ["| method | base | new | HM | per seed: base / new |", "|---|---:|---:|---:|---|"]
    for method, metrics in cells.items():
        if method == "average" or "base_accuracy" not in metrics:
            continue
        mine = [r for r in results if r["method"] == method]
        per_seed = ", ".join(f"{100 * r['base_accuracy']:.2f} / {100 * r['new_accuracy']:.2f}" for r in mine)
        if not mine:  # the zero-shot row: the same frozen model for every seed
            per_seed = "(every seed)"

        lines.append(
            f"| {method} | {cell(metrics, 'base_accuracy')} | {cell(metrics, 'new_accuracy')} | "
            f"{100 * metrics['harmonic_mean']['mean']:.2f} | {per_seed} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    args = parser.parse_args()
    results = [run(args.output_dir, row, seed) for row in args.rows for seed in args.seeds]
    rows = aggregate("base_to_new", results)
    table = markdown(rows, results)
    OutputFolder(args.output_dir).write_json("results.json", {"runs": results, "aggregate": rows})
    print(table)


if __name__ == "__main__":
    main()
