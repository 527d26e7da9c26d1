"""A resumable grid of training runs, shared by the benchmark and the ablation: a finished run is reused only when
its recorded identity (arguments, config, data fingerprint) matches, a killed run continues from its latest
checkpoint, a damaged result is named and redone, and each run is the library's `train` with typed arguments.

A run is one `run_one(GridRun)` call, the same in this process and in a job elsewhere (`executors.py`): a `GridRun`
is small and picklable, its `finish` step included."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from accelerate import PartialState
from tqdm.auto import tqdm

from ..data.datasets import load_tasks
from ..training.arguments import TrainArguments
from ..training.linear_probe import METHOD as LINEAR_PROBE
from ..training.linear_probe import USED_CONFIG_VALUES, check_probe_dependency, probe_identity
from ..training.run_dir import first_difference, read_json
from ..training.run_layout import METRICS_FILE, RUN_FILE, continue_options
from ..training.setup import run_identity
from ..training.trainer import train
from ..utils.errors import UserInputError
from ..utils.write_policy import OutputFolder, OutputRefused

logger = logging.getLogger(__name__)
# What `train --method` takes (TrainArguments' Literal): a grid accepts exactly these.
TRAIN_METHODS: tuple[str, ...] = typing.get_args(typing.get_type_hints(TrainArguments)["method"])
# The order of a table's rows: the baselines, the prompt methods, LoRA; variants follow in the order given.
METHOD_ORDER = ("linear_probe", "coop", "vpt", "vpt_coop", "dpt", "lora")
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
# Train flags that the grid sets for each run, so a variant may not.
GRID_SET_FLAGS = ("output_dir", "seed", "resume_from_checkpoint", "overwrite_output_dir")


@dataclass(frozen=True)
class Variant:
    """One row of a grid's table: its name (also its runs' folder name) and the training flags its runs get on top
    of those given for every run. `--methods coop` is the row "coop" with --method coop; `--variant NAME=FLAGS` is
    the row NAME with FLAGS (any of train's, e.g. --method dpt --consistency_weights 10 25 1), which are part of the
    runs' identity like every other argument."""

    name: str
    options: dict = field(default_factory=dict)  # TrainArguments values, --method among them
    config_options: dict = field(default_factory=dict)  # DPTConfig values
    flags: str = ""  # as the user wrote them, for the report

    @classmethod
    def of_method(cls, method: str) -> Variant:
        return cls(method, {"method": method}, {}, f"--method {method}")

    @property
    def method(self) -> str:
        return self.options.get("method", TrainArguments.method)

    def run_options(self, options: dict, config_options: dict) -> tuple[dict, dict]:
        """The TrainArguments and DPTConfig values of this row's runs: the grid's, then its own (they win). A linear
        probe learns no prompts: of the grid's DPTConfig values it takes only those its zero-shot classifier uses."""
        if self.method == LINEAR_PROBE:
            config_options = {k: v for k, v in config_options.items() if k in USED_CONFIG_VALUES}
        return {**options, **self.options}, {**config_options, **self.config_options}


def check_variants(variants: Sequence[Variant], flag: str = "--methods") -> None:
    """A grid's rows, refused before any work: unknown methods, names that cannot name a folder, a name twice, and a
    linear probe without scikit-learn."""
    if not variants:
        raise UserInputError(f"{flag}: name at least one method (or a --variant).")
    seen: set[str] = set()
    for variant in variants:
        if variant.method not in TRAIN_METHODS:
            raise UserInputError(
                f"{flag}: {variant.method!r} is not a method of train; choose from {', '.join(TRAIN_METHODS)}."
            )
        if not VARIANT_NAME.fullmatch(variant.name) or variant.name == "zero_shot":
            raise UserInputError(
                f"--variant {variant.name!r}: a row's name names its runs' folders; use letters, digits and _ . + - "
                "(at most 64, not 'zero_shot'), e.g. dpt_src=--consistency_weights 10 25 1."
            )
        fixed = [name for name in GRID_SET_FLAGS if name in variant.options]
        if fixed:
            raise UserInputError(f"--variant {variant.name}: --{fixed[0]} is set by the grid for each run; drop it.")
        if variant.name in seen:
            raise UserInputError(f"{flag}: the row {variant.name!r} is given twice; give each method or name once.")
        seen.add(variant.name)
    if any(variant.method == LINEAR_PROBE for variant in variants):
        check_probe_dependency()


def check_grid_options(options: dict) -> None:
    """The train flags given for every run of a grid: --method would make every row the same method."""
    if "method" in options:
        raise UserInputError(
            f"--method {options['method']} would train every row as {options['method']}; name the rows with "
            "--methods, or a row with its own flags with --variant NAME='--method ...'."
        )


def row_order(name: str, variants: Sequence[Variant] = ()) -> tuple[int, int, str]:
    """Sort key of a table's rows: zero-shot, the methods in `METHOD_ORDER`, then the other rows as given."""
    if name == "zero_shot":
        return 0, 0, name
    if name in METHOD_ORDER:
        return 1, METHOD_ORDER.index(name), name
    names = [variant.name for variant in variants]
    return 2, names.index(name) if name in names else len(names), name


class RunFinish(Protocol):
    """What turns a trained run's metrics into its result (the benchmark's evaluations); an instance of a
    module-level class, so that the run pickles with it."""

    def __call__(self, run: GridRun, metrics: dict) -> dict: ...


@dataclass(frozen=True)
class GridRun:
    """One run of a grid: its training arguments, its DPTConfig values, where its result is written last (present:
    the run is finished; None: the training metrics are the result) and what makes that result (None: the metrics)."""

    label: str
    args: TrainArguments
    config_overrides: dict
    result_file: Path | None = None
    finish: RunFinish | None = None

    @classmethod
    def make(
        cls,
        label: str,
        fields: dict,
        options: dict,
        config_options: dict,
        result_file: Path | None = None,
        finish: RunFinish | None = None,
    ) -> GridRun:
        """A run with its own TrainArguments `fields`, then `options` (given for every run of the grid, they win as
        later flags do), and the DPTConfig values `config_options` plus those of its dataset."""
        args = TrainArguments(**{**fields, **options})
        return cls(label, args, args.config_overrides(config_options), result_file, finish)

    @property
    def metrics_file(self) -> Path:
        return Path(self.args.output_dir) / METRICS_FILE

    @property
    def finished_file(self) -> Path:
        return self.result_file or self.metrics_file

    def train_settings(self) -> dict:
        """The run as `dpt-peft train SETTINGS.json` takes it: its arguments that differ from train's defaults, its
        DPTConfig values, and how to continue what a killed run left (`--print_commands`)."""
        defaults = TrainArguments()
        settings = {
            f.name: getattr(self.args, f.name)
            for f in dataclasses.fields(TrainArguments)
            if getattr(self.args, f.name) != getattr(defaults, f.name)
        }
        settings = {**settings, **self.config_overrides, **continue_options(self.args.output_dir)}
        return json.loads(json.dumps(settings, default=str))


def read_result(path: Path) -> dict | None:
    """A result or metrics file of ours; None when it is absent, or damaged (a full disk, a kill) and removed so the
    run is redone. A damaged file that dpt_peft did not record is refused, naming it."""
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(value, dict):
            return value
        problem = f"holds a {type(value).__name__}, not a mapping"
    except (OSError, UnicodeDecodeError, ValueError) as err:
        problem = f"cannot be read ({type(err).__name__}: {err})"
    if not OutputFolder(path.parent).recorded(path.name):
        raise OutputRefused(f"{path} {problem}, and dpt_peft did not write it; move it away and run the grid again.")
    logger.warning("%s %s (half-written or corrupt): removing it and redoing the run.", path, problem)
    path.unlink()
    return None


def check_identity(run: GridRun) -> None:
    """Refuse to reuse a finished run made with other arguments or on other data, showing the difference."""
    run_file = Path(run.args.output_dir) / RUN_FILE
    if not run_file.exists():
        raise OutputRefused(
            f"{run.finished_file} holds a result, but {run_file} (what made it) is missing, so it cannot be reused "
            "under these settings; choose another --output_dir, or delete the run's folder."
        )
    fix = "delete the run's folder to redo it, or choose another --output_dir."
    recorded = read_json(run_file, "the arguments of a finished run of this grid", fix)
    identity_of = probe_identity if run.args.method == LINEAR_PROBE else run_identity
    _, identity = identity_of(run.args, run.config_overrides, load_tasks(run.args.data_spec))
    difference = first_difference(recorded, identity)
    if difference is not None:
        raise OutputRefused(
            f"{run.label} was finished with other settings ({difference}), so its result is not reported under these; "
            "choose another --output_dir for the new settings, or delete the run's folder to redo it."
        )


def run_one(run: GridRun) -> dict:
    """One run of a grid, the same wherever it runs (this process, a job on another GPU, a SLURM task): its result
    read back when finished with the same identity; else trained (or its training metrics read back) and, with
    `finish`, turned into the result written to the run's `result_file`."""
    finished = read_result(run.finished_file)
    if finished is not None:
        check_identity(run)
        return finished
    metrics = read_result(run.metrics_file)  # trained, but killed before its result was written
    if metrics is not None:
        check_identity(run)
    else:
        args = dataclasses.replace(run.args, **continue_options(run.args.output_dir))
        metrics = train(args, run.config_overrides)
    if run.finish is not None:
        metrics = run.finish(run, metrics)
        if PartialState().is_main_process and run.result_file is not None:
            OutputFolder(run.result_file.parent).write_json(run.result_file.name, metrics)
    return metrics


def run_grid(runs: Sequence[GridRun]) -> list[dict]:
    """Each run's result, in order, one run after another in this process (`run_one`)."""
    progress = tqdm(runs, desc="runs", disable=not PartialState().is_main_process)
    results = []
    for run in progress:
        progress.set_postfix_str(run.label, refresh=True)
        results.append(run_one(run))
    return results
