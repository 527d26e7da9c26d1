"""A resumable grid of training runs, shared by the benchmark and the ablation: a finished run is reused only when
its recorded identity (arguments, config, data fingerprint) matches, a killed run continues from its latest
checkpoint, a damaged result is named and redone, and each run is the library's `train` with typed arguments.

A run is one `run_one(GridRun)` call, the same in this process and in a job elsewhere (`executors.py`): a `GridRun`
is small and picklable, its `finish` step included."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from accelerate import PartialState
from tqdm.auto import tqdm

from ..data.datasets import load_tasks
from ..training.arguments import TrainArguments
from ..training.run_dir import first_difference, read_json
from ..training.run_layout import METRICS_FILE, RUN_FILE, continue_options
from ..training.setup import run_identity
from ..training.trainer import train
from ..utils.write_policy import OutputFolder, OutputRefused

logger = logging.getLogger(__name__)


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
    _, identity = run_identity(run.args, run.config_overrides, load_tasks(run.args.data_spec))
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
