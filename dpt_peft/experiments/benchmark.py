"""The paper's benchmark protocols over the CoOp datasets: a resumable grid of runs, then mean ± std over seeds.

- `few_shot`: every dataset x shots x seed x method, accuracy on the dataset's test split.
- `base_to_new`: trained on the base half of the classes (CoCoOp's rule), evaluated on base and new classes.
- `cross_dataset`: trained on ImageNet, its class side re-targeted to each of the ten other datasets.
- `domain_generalization`: trained on ImageNet, evaluated on ImageNet-V2, -Sketch, -A and -R.

Each run has its own directory holding its training run (`train/`: adapter, metrics, splits as JSON) and its
`result.json`, written last. A finished run is skipped; a killed one continues from its latest checkpoint.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data.catalog import COOP_DATASETS, load_coop_dataset
from ..training.checkpoints import continue_flags
from ..utils.plots import plot_accuracy_against_shots

PROTOCOLS = ("few_shot", "base_to_new", "cross_dataset", "domain_generalization")
# The paper's 11 few-shot datasets; ImageNet is the source of the two transfer protocols.
FEW_SHOT_DATASETS = (
    "imagenet",
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
)
SOURCE_DATASET = "imagenet"
CROSS_DATASET_TARGETS = tuple(name for name in FEW_SHOT_DATASETS if name != SOURCE_DATASET)
DOMAIN_GENERALIZATION_TARGETS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid."""

    protocol: str
    dataset: str
    method: str
    shots: int
    seed: int

    @property
    def relative_dir(self) -> Path:
        return Path(self.protocol) / self.dataset / self.method / f"shots{self.shots}_seed{self.seed}"


def plan(protocol: str, datasets: list[str], shots: list[int], seeds: list[int], methods: list[str]) -> list[RunSpec]:
    """The runs of a protocol. Transfer protocols train on ImageNet with the largest `shots` (16 in the paper),
    and so does base-to-new."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol {protocol!r} is unknown; choose one of {', '.join(PROTOCOLS)}.")
    unknown = [name for name in datasets if name not in COOP_DATASETS]
    if unknown:
        raise ValueError(f"--datasets: {unknown[0]!r} is not a CoOp dataset; choose from {', '.join(COOP_DATASETS)}.")
    if protocol == "few_shot":
        return [
            RunSpec(protocol, dataset, method, k, seed)
            for dataset in datasets
            for k in shots
            for seed in seeds
            for method in methods
        ]
    sources = datasets if protocol == "base_to_new" else [SOURCE_DATASET]
    return [RunSpec(protocol, d, method, max(shots), seed) for d in sources for seed in seeds for method in methods]


def targets(protocol: str, datasets: list[str]) -> list[str]:
    """Datasets an ImageNet adapter is evaluated on: `--datasets` when given, else the paper's."""
    if protocol == "cross_dataset":
        return [d for d in datasets if d != SOURCE_DATASET] or list(CROSS_DATASET_TARGETS)
    return [d for d in datasets if d in DOMAIN_GENERALIZATION_TARGETS] or list(DOMAIN_GENERALIZATION_TARGETS)


def run_grid(
    protocol: str,
    data_root: str,
    output_dir: str,
    datasets: list[str],
    shots: list[int],
    seeds: list[int],
    methods: list[str],
    model_name_or_path: str | None = None,
    extra: list[str] | None = None,
) -> list[dict]:
    """Run (or skip, when finished) every run of the protocol; returns their results."""
    from ..cli import train_main

    evaluation_targets = targets(protocol, datasets) if protocol in PROTOCOLS[2:] else []
    runs = plan(protocol, datasets if protocol != "domain_generalization" else [SOURCE_DATASET], shots, seeds, methods)
    model = ["--model_name_or_path", model_name_or_path] if model_name_or_path else []
    results = []
    for number, spec in enumerate(runs, 1):
        run_dir = Path(output_dir) / spec.relative_dir
        result_file = run_dir / RESULT_FILE
        if result_file.exists():
            print(f"[{number}/{len(runs)}] {spec.relative_dir}: done, skipped", flush=True)
            results.append(json.loads(result_file.read_text()))
            continue
        print(f"[{number}/{len(runs)}] {spec.relative_dir}", flush=True)
        train_dir = run_dir / "train"
        if not (train_dir / "metrics.json").exists():
            argv = [
                *("--dataset", spec.dataset, "--data_root", data_root, "--method", spec.method),
                *("--shots", str(spec.shots), "--seed", str(spec.seed), "--output_dir", str(train_dir)),
                *("--report_to", "none", *model, *(extra or [])),
            ]
            if protocol == "base_to_new":
                argv += ["--subsample_classes", "base"]
            train_main([*argv, *continue_flags(train_dir)])
        metrics = json.loads((train_dir / "metrics.json").read_text())
        result = {
            **asdict(spec),
            **_evaluate(spec, metrics, train_dir, data_root, evaluation_targets, model_name_or_path),
        }
        result_file.write_text(json.dumps(result, indent=2))
        results.append(result)
    return results


def _evaluate(
    spec: RunSpec, metrics: dict, train_dir: Path, data_root: str, evaluation_targets: list[str], model: str | None
) -> dict:
    from ..training.evaluation import evaluate_adapter

    adapter = str(train_dir / "adapter")
    if spec.protocol == "few_shot":
        return {"accuracy": metrics["accuracy"], "zero_shot_accuracy": metrics["zero_shot_accuracy"]}
    if spec.protocol == "base_to_new":
        test = load_coop_dataset(spec.dataset, data_root)["test"]
        names = list(test.features["label"].names)
        report = evaluate_adapter(
            model, adapter, test, names, "image", "label", str(train_dir.parent / "eval"), base_to_new=True
        )
        keys = ("base_accuracy", "new_accuracy", "harmonic_mean", "zero_shot_base_accuracy", "zero_shot_new_accuracy")
        return {key: report["base_to_new"][key] for key in keys}
    accuracies = {"source_accuracy": metrics["accuracy"]}
    for target in evaluation_targets:
        test = load_coop_dataset(target, data_root)["test"]
        names = list(test.features["label"].names)
        out = str(train_dir.parent / "eval" / target)
        accuracies[target] = evaluate_adapter(model, adapter, test, names, "image", "label", out)["accuracy"]
    return accuracies


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(protocol: str, results: list[dict]) -> list[dict]:
    """Mean ± std over seeds of every metric, per (dataset, method, shots)."""
    groups: dict[tuple, list[dict]] = {}
    for result in results:
        groups.setdefault((result["dataset"], result["method"], result["shots"]), []).append(result)
    rows = []
    skip = {"protocol", "dataset", "method", "shots", "seed"}
    for (dataset, method, shots), members in sorted(groups.items()):
        for metric in [key for key in members[0] if key not in skip]:
            mean, std = _mean_std([m[metric] for m in members])
            row = {"protocol": protocol, "dataset": dataset, "method": method, "shots": shots, "metric": metric}
            rows.append({**row, "mean": mean, "std": std, "seeds": len(members)})
    return rows


def write_report(protocol: str, rows: list[dict], output_dir: str) -> Path:
    """results.csv, results.md and, for few-shot, accuracy against shots per dataset (PNG)."""
    folder = Path(output_dir) / protocol
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(
            f, fieldnames=["protocol", "dataset", "method", "shots", "metric", "mean", "std", "seeds"]
        )
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {protocol.replace('_', ' ')}: mean ± std over seeds (accuracy, %)", ""]
    lines += _markdown_table(protocol, rows)
    if protocol == "few_shot":
        plot_accuracy_against_shots(rows, str(folder / "accuracy_vs_shots.png"))
        lines += ["", "![accuracy against shots](accuracy_vs_shots.png)"]
    (folder / "results.md").write_text("\n".join(lines) + "\n")
    return folder / "results.md"


def _markdown_table(protocol: str, rows: list[dict]) -> list[str]:
    def cell(row: dict | None) -> str:
        return "-" if row is None else f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}"

    index = {(r["dataset"], r["method"], r["shots"], r["metric"]): r for r in rows}
    keys = sorted({(r["dataset"], r["method"], r["shots"]) for r in rows})
    metric_names: dict[str, list[str]] = {
        "few_shot": ["zero_shot_accuracy", "accuracy"],
        "base_to_new": ["base_accuracy", "new_accuracy", "harmonic_mean"],
    }
    metrics = metric_names.get(protocol) or sorted({r["metric"] for r in rows}, key=_source_first)
    header = "| dataset | method | shots | " + " | ".join(m.replace("_", " ") for m in metrics) + " |"
    lines = [header, "|---|---|---:|" + "---:|" * len(metrics)]
    for dataset, method, shots in keys:
        cells = " | ".join(cell(index.get((dataset, method, shots, metric))) for metric in metrics)
        lines.append(f"| {dataset} | {method} | {shots} | {cells} |")
    return lines


def _source_first(metric: str) -> tuple[bool, str]:
    return metric != "source_accuracy", metric


def benchmark(
    protocol: str,
    data_root: str,
    output_dir: str,
    datasets: list[str],
    shots: list[int],
    seeds: list[int],
    methods: list[str],
    model_name_or_path: str | None = None,
    extra: list[str] | None = None,
) -> Path:
    """Run the grid, aggregate it and write the report; returns the path of results.md."""
    results = run_grid(protocol, data_root, output_dir, datasets, shots, seeds, methods, model_name_or_path, extra)
    return write_report(protocol, aggregate(protocol, results), output_dir)
