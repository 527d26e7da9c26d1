"""The paper's benchmark protocols over the CoOp datasets: a resumable grid of runs, then mean ± std over seeds.

- `few_shot`: every dataset x shots x seed x method, accuracy on the dataset's test split.
- `base_to_new`: trained on the base half of the classes (CoCoOp's rule), evaluated on base and new classes.
- `cross_dataset`: trained on ImageNet, its class side re-targeted to each of the ten other datasets.
- `domain_generalization`: trained on ImageNet, evaluated on ImageNet-V2, -Sketch, -A and -R.

Each run has its own directory holding its training run (`train/`: adapter, metrics, splits as JSON) and its
`result.json`, written last. A finished run is skipped; a killed one continues from its latest checkpoint, and a
target it already evaluated (`eval/<target>/eval_metrics.json`) is read back, not evaluated again. Before the
first run, every dataset the grid reads is checked (`data.check`): a missing folder or image fails in seconds.
Transfer targets are scored with their own zero-shot template, as DPT builds its model per dataset. The runs run in
this process, or spread over the GPUs of a node or a SLURM cluster (`executors.py`, `--executor`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets import Dataset

from ..data.catalog import COOP_DATASETS, DOMAIN_GENERALIZATION_TARGETS, FEW_SHOT_DATASETS, dataset_spec
from ..data.check import require_data
from ..data.coop_readers import load_coop_dataset, missing_images, prompt_class_names
from ..training.evaluation import EvaluationSpec, evaluate_adapter
from ..training.linear_probe import METHOD as LINEAR_PROBE
from ..training.linear_probe_model import PROBE_DIR, evaluate_linear_probe, load_probe
from ..utils.errors import UserInputError
from .benchmark_report import COSTS, NOT_SCORED, aggregate, check_report_target, write_report
from .executors import ExecutorSpec, GridRunsFailed, execute, train_commands
from .grid import GridRun, Variant, check_grid_options, check_variants, read_result

PROTOCOLS = ("few_shot", "base_to_new", "cross_dataset", "domain_generalization")
SOURCE_DATASET = "imagenet"  # the source of the two transfer protocols
CROSS_DATASET_TARGETS = tuple(name for name in FEW_SHOT_DATASETS if name != SOURCE_DATASET)
RESULT_FILE = "result.json"
EVAL_FILE = "eval_metrics.json"
# Why a linear probe's cell reads n/a: it has weights only for the classes it was trained on.
NEW_CLASSES = "a linear probe has weights only for the classes it was trained on: it cannot score new classes"
OTHER = "a linear probe has weights only for the classes it was trained on: it cannot score another dataset's"
__all__ = [
    "DOMAIN_GENERALIZATION_TARGETS",
    "FEW_SHOT_DATASETS",
    "GridSpec",
    "aggregate",
    "benchmark",
    "benchmark_commands",
    "plan",
    "write_report",
]


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
        raise UserInputError(f"--protocol {protocol!r} is unknown; choose one of {', '.join(PROTOCOLS)}.")
    unknown = [name for name in datasets if name not in COOP_DATASETS]
    if unknown:
        raise UserInputError(
            f"--datasets: {unknown[0]!r} is not a CoOp dataset; choose from {', '.join(COOP_DATASETS)}."
        )
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


@dataclass(frozen=True)
class GridSpec:
    """A benchmark grid (`dpt-peft benchmark`): a protocol over datasets x shots x seeds x methods. `options`
    (TrainArguments values) and `config_options` (DPTConfig values) apply to every run; a `zero_shot_template` among
    them also replaces each transfer target's own template, and `skip_missing_images` among them makes the data check
    and the evaluations count, not refuse, the images a split lists but the disk lacks."""

    protocol: str
    data_root: str
    output_dir: str
    datasets: list[str]
    shots: list[int]
    seeds: list[int]
    methods: list[str]
    model_name_or_path: str | None = None
    options: dict = field(default_factory=dict)
    config_options: dict = field(default_factory=dict)
    variants: list[Variant] | None = None  # further rows, each with its own train flags

    @property
    def rows(self) -> list[Variant]:
        """The table's rows: one per method, then the variants."""
        return [Variant.of_method(method) for method in self.methods] + list(self.variants or ())

    @property
    def skip_missing_images(self) -> bool:
        return bool(self.options.get("skip_missing_images"))

    @property
    def given_template(self) -> str | None:
        return self.config_options.get("zero_shot_template")

    def runs(self) -> list[RunSpec]:
        """The training runs: on `datasets`, or on ImageNet for domain generalization (`datasets` are its targets)."""
        sources = self.datasets if self.protocol != "domain_generalization" else [SOURCE_DATASET]
        return plan(self.protocol, sources, self.shots, self.seeds, [row.name for row in self.rows])

    def evaluation_targets(self) -> list[str]:
        """The datasets an ImageNet adapter of a transfer protocol is scored on (none for the other protocols)."""
        return targets(self.protocol, self.datasets) if self.protocol in PROTOCOLS[2:] else []

    @property
    def folder(self) -> Path:
        """The protocol's folder: its runs, reports, job logs and printed commands."""
        return Path(self.output_dir) / self.protocol


def run_protocol(grid: GridSpec, executor: ExecutorSpec | None = None) -> list[dict]:
    """Check the data, then run (or skip, when finished) every run of the grid, here or with `executor`; returns
    their results (`GridRunsFailed` when some failed: the others' results with it)."""
    return execute(checked_runs(grid), executor or ExecutorSpec(), grid.folder)


def checked_runs(grid: GridSpec) -> list[GridRun]:
    """The grid's runs, once its rows and every dataset they read are checked."""
    check_variants(grid.rows)
    check_grid_options(grid.options)
    specs = grid.runs()
    needed = list(dict.fromkeys([spec.dataset for spec in specs] + grid.evaluation_targets()))
    require_data(grid.data_root, needed, grid.skip_missing_images)
    return [_grid_run(grid, spec) for spec in specs]


def _grid_run(grid: GridSpec, spec: RunSpec) -> GridRun:
    """The training run of `spec`, in its own folder under the grid's."""
    run_dir = Path(grid.output_dir) / spec.relative_dir
    row = next(row for row in grid.rows if row.name == spec.method)
    fields = {
        "dataset": spec.dataset,
        "data_root": grid.data_root,
        "method": row.method,
        "shots": spec.shots,
        "seed": spec.seed,
        "output_dir": str(run_dir / "train"),
        "report_to": "none",
    }
    if spec.protocol == "base_to_new":
        fields["subsample_classes"] = "base"
    if grid.model_name_or_path:
        fields["model_name_or_path"] = grid.model_name_or_path
    finish = Evaluation(spec, run_dir / "train", grid, row.method)
    options, config_options = row.run_options(grid.options, grid.config_options)
    return GridRun.make(str(spec.relative_dir), fields, options, config_options, run_dir / RESULT_FILE, finish)


@dataclass(frozen=True)
class Evaluation:
    """The evaluations of one trained run of `grid`: base-to-new on its own test set, or each transfer target; the
    run's `finish` step (`grid.RunFinish`), shipped with it to wherever it runs."""

    spec: RunSpec
    train_dir: Path
    grid: GridSpec
    method: str = "dpt"  # train's --method of the run's row

    def __call__(self, run: GridRun, metrics: dict) -> dict:
        """The run's result: its place in the grid, its numbers and its costs (`COSTS`, from its metrics.json)."""
        costs = {key: metrics.get(key) for key in COSTS}
        return {**asdict(self.spec), **self.result(metrics, self.grid.evaluation_targets()), **costs}

    def result(self, metrics: dict, evaluation_targets: list[str]) -> dict:
        """The run's numbers, with the images skipped as unreadable or missing from disk in all it scored."""
        test = self.test_split(self.spec.dataset)
        counts = {"skipped_images": metrics.get("skipped_images", 0), "missing_images": missing_images(test)}
        if self.spec.protocol == "few_shot":
            return {"accuracy": metrics["accuracy"], "zero_shot_accuracy": metrics["zero_shot_accuracy"], **counts}
        if self.spec.protocol == "base_to_new" and self.method == LINEAR_PROBE:
            return {**probe_base_to_new(metrics), **counts}
        if self.spec.protocol == "base_to_new":
            report = self.evaluate(self.spec.dataset, self.train_dir.parent / "eval", base_to_new=True)
            keys = (
                "base_accuracy",
                "new_accuracy",
                "harmonic_mean",
                "zero_shot_base_accuracy",
                "zero_shot_new_accuracy",
            )
            return {**{key: report["base_to_new"][key] for key in keys}, **_counts(report)}
        result = {"source_accuracy": metrics["accuracy"], **counts}
        if self.method == LINEAR_PROBE and self.spec.protocol == "cross_dataset":
            return {**result, **dict.fromkeys(evaluation_targets), NOT_SCORED: dict.fromkeys(evaluation_targets, OTHER)}
        for target in evaluation_targets:
            if self.method == LINEAR_PROBE and not self.probe_knows(target):
                result[target] = None
                result.setdefault(NOT_SCORED, {})[target] = OTHER
                continue
            report = self.evaluate(target, self.train_dir.parent / "eval" / target)
            result[target] = report["accuracy"]
            for key, count in _counts(report).items():
                result[key] += count
        return result

    def probe_knows(self, dataset: str) -> bool:
        """Whether the run's linear probe has weights for every class of `dataset` (ImageNet-A's are ImageNet's)."""
        _, record = load_probe(self.train_dir)
        return set(prompt_class_names(self.test_split(dataset))) <= set(record["class_names"])

    def test_split(self, dataset: str) -> Dataset:
        return load_coop_dataset(dataset, self.grid.data_root, self.grid.skip_missing_images)["test"]

    def evaluate(self, dataset: str, out: Path, base_to_new: bool = False) -> dict:
        """`evaluate_adapter` on the dataset's test split, or its report read back when a killed grid wrote it."""
        written = read_result(out / EVAL_FILE)  # a damaged one is named, removed and redone
        if written is not None:
            return written
        test = self.test_split(dataset)
        probe = self.method == LINEAR_PROBE  # scored by its weights, on classes it was trained on (DG's targets)
        spec = EvaluationSpec(
            adapter=str(self.train_dir / (PROBE_DIR if probe else "adapter")),
            split=test,
            class_names=prompt_class_names(test),
            model_name_or_path=self.grid.model_name_or_path,
            base_to_new=base_to_new,
            zero_shot_template=None if base_to_new else self.grid.given_template or dataset_spec(dataset).template,
        )
        return (evaluate_linear_probe if probe else evaluate_adapter)(spec, str(out))


def probe_base_to_new(metrics: dict) -> dict:
    """A linear probe's base-to-new result: trained and tested on the base classes (its run's own test), no new
    classes to score, said in the result (`NOT_SCORED`) that the report prints as n/a."""
    new = ("new_accuracy", "harmonic_mean", "zero_shot_new_accuracy")
    return {
        "base_accuracy": metrics["accuracy"],
        **dict.fromkeys(new),
        "zero_shot_base_accuracy": metrics["zero_shot_accuracy"],
        NOT_SCORED: dict.fromkeys(new, NEW_CLASSES),
    }


def _counts(report: dict) -> dict[str, int]:
    return {"skipped_images": report.get("skipped_images", 0), "missing_images": report.get("missing_images", 0)}


def benchmark(
    grid: GridSpec,
    *,
    executor: ExecutorSpec | None = None,
    confidence_interval: bool = False,
    overwrite_reports: bool = False,
) -> Path:
    """Run the grid (here, or with `executor`), aggregate it as CoOp/CoCoOp do and write the report; returns the path
    of results.md. When runs failed, the report holds those that finished, then `GridRunsFailed` names the others.
    `overwrite_reports` (--overwrite_reports) replaces report files there that dpt_peft did not write."""
    check_report_target(grid.protocol, grid.output_dir, overwrite_reports)  # before the first run, not after the last
    try:
        results = run_protocol(grid, executor)
    except GridRunsFailed as failed:
        if failed.finished:
            rows = aggregate(grid.protocol, [result for _, result in failed.finished])
            write_report(grid.protocol, rows, grid.output_dir, confidence_interval)
        raise
    return write_report(grid.protocol, aggregate(grid.protocol, results), grid.output_dir, confidence_interval)


def benchmark_commands(grid: GridSpec) -> list[str]:
    """`--print_commands`: a `dpt-peft train` command per run not yet trained (its settings written beside), once the
    data is checked; the benchmark command, run again afterwards, evaluates and reports them."""
    return train_commands(checked_runs(grid), grid.folder)
