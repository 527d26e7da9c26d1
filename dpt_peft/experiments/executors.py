"""Where a grid's runs run (`--executor`): one after another in this process (`sequential`), one job per GPU (or CPU
slot) of this machine at a time (`local`), or a SLURM job array with one GPU per task (`slurm`), the last two through
submitit (`pip install dpt-peft[cluster]`).

Every job runs `grid.run_one` on its picklable `GridRun`, so a run does the same wherever it runs: results, resume,
identity checks and report files are the sequential runner's. The parent process checks the grid first (finished runs
are read back and their identity checked, and only the others are submitted), waits for every job, and reads each
result back from its file: never from a pickle. A job that failed leaves its log under `<grid>/logs/`, and the parent
names it once every other run is done (`GridRunsFailed`); the same command submits only what is still missing.

submitit's own defaults would cut runs short (2 minutes locally, 5 on SLURM), so a time limit is always set. A job
is checkpointable (`RunJob.checkpoint`): preempted or out of time on SLURM, it is requeued, and `run_one` continues
the run from its latest checkpoint.
"""

from __future__ import annotations

import os
import shlex
import shutil
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..utils.errors import UserInputError
from ..utils.write_policy import OutputFolder
from .grid import GridRun, check_identity, read_result, run_grid, run_one

EXECUTORS = ("sequential", "local", "slurm")
LOGS_DIR = "logs"  # under the grid's folder: submitit's job files and each job's stdout/stderr
COMMANDS_DIR = "commands"  # under the grid's folder: one settings file per pending run (--print_commands)
SLURM_JOBS_FILE = "slurm_jobs.json"  # in LOGS_DIR: the job id of each submitted run, so a re-run never submits twice
LOCAL_TIME_LIMIT_MIN = 30 * 24 * 60  # a run on one's own machine is never cut short (submitit's default: 2 minutes)
POLL_S = 1.0
CLUSTER_EXTRA = "pip install 'dpt-peft[cluster]'"
# submitit's unfinished states but UNKNOWN (sacct knows no such job): such a run is submitted again
UNFINISHED_SLURM_STATES = ("READY", "PENDING", "RUNNING", "REQUEUED", "COMPLETING", "PREEMPTED")


@dataclass(frozen=True)
class ExecutorSpec:
    """How a grid's runs are spread (`--executor` and its flags)."""

    kind: str = "sequential"
    gpus: tuple[int, ...] | None = None  # local: the GPUs, one run on each at a time (default: every visible one)
    max_parallel: int | None = None  # local: at most this many runs at once (CPU processes when no GPU is visible)
    slurm_partition: str | None = None
    slurm_time_min: int | None = None  # each array task's time limit, required
    slurm_max_concurrent: int | None = None  # array tasks running at once (default: SLURM's limit)
    slurm_sbatch: dict[str, str] = field(default_factory=dict)  # further sbatch settings, passed through

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise UserInputError(f"--executor {self.kind!r} is unknown; choose one of {', '.join(EXECUTORS)}.")
        local = {"--gpus": self.gpus, "--max_parallel": self.max_parallel}
        slurm = {
            "--slurm_partition": self.slurm_partition,
            "--slurm_time_min": self.slurm_time_min,
            "--slurm_max_concurrent": self.slurm_max_concurrent,
            "--slurm_sbatch": self.slurm_sbatch or None,
        }
        misplaced = {"local": slurm, "slurm": local}.get(self.kind, {**local, **slurm})
        given = [flag for flag, value in misplaced.items() if value is not None]
        if given:
            owner = "--executor local" if given[0] in local else "--executor slurm"
            raise UserInputError(f"{given[0]} applies to {owner} only; drop it or pass {owner}.")
        for flag, value in (
            ("--max_parallel", self.max_parallel),
            ("--slurm_max_concurrent", self.slurm_max_concurrent),
        ):
            if value is not None and value < 1:
                raise UserInputError(f"{flag} {value} must be at least 1.")
        if self.gpus is not None and (not self.gpus or min(self.gpus) < 0 or len(set(self.gpus)) < len(self.gpus)):
            raise UserInputError(f"--gpus {self.gpus} must list distinct GPU indices (0, 1, ...), e.g. --gpus 0,1,2,3.")
        if self.kind == "slurm" and (self.slurm_time_min is None or self.slurm_time_min < 1):
            raise UserInputError(
                "--executor slurm needs --slurm_time_min: each task's time limit in minutes (submitit would give 5); "
                "a task out of time is requeued and continues from its checkpoint."
            )


@dataclass(frozen=True)
class RunFailure:
    """A run whose job ended without its result: why (the last line of its log) and where its log is."""

    label: str
    reason: str
    log: Path | None


class GridRunsFailed(UserInputError):
    """Some runs of a grid failed; the others finished (`finished`: each run with its result, in the grid's order)."""

    def __init__(self, failures: list[RunFailure], finished: list[tuple[GridRun, dict]]):
        self.failures, self.finished = failures, finished
        named = "; ".join(f"{f.label} ({f.reason}; log: {f.log or 'none'})" for f in failures)
        total = len(failures) + len(finished)
        super().__init__(
            f"{len(failures)} of {total} runs failed, the reports hold the {len(finished)} that finished: {named}. "
            "Fix the cause and run the same command again: only the runs without a result are submitted."
        )


class RunJob:
    """What a job runs: `run_one` on its run, with `threads` CPU threads when it shares a CPU with others.
    Checkpointable for submitit: preempted or out of time, the job is requeued with the same run, which continues
    from its latest checkpoint (`run_one` resumes what a killed run left)."""

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def __call__(self, run: GridRun) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        run_one(run)  # the result is its file: nothing is pickled back

    def checkpoint(self, run: GridRun) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, run)


def execute(runs: Sequence[GridRun], executor: ExecutorSpec, folder: Path) -> list[dict]:
    """Each run's result, in order: run by `executor`, with the jobs' files under `folder`/logs. Finished runs are
    read back (their identity checked) before anything is submitted; when runs fail, `GridRunsFailed` once every
    other run is done."""
    if executor.kind == "sequential":
        return run_grid(runs)
    pending, logs = pending_runs(runs), {}
    if pending:
        submitit = require_submitit()
        OutputFolder(folder).record_dir(LOGS_DIR)  # submitit writes there: dpt_peft's files, never a user's
        run_jobs = run_local if executor.kind == "local" else run_slurm
        logs = run_jobs(submitit, pending, executor, Path(folder))
    finished, failures = [], []
    for run in runs:
        result = read_result(run.finished_file)
        if result is not None:
            finished.append((run, result))
        else:
            failures.append(_failure(run, logs.get(run.label)))
    if failures:
        raise GridRunsFailed(failures, finished)
    return [result for _, result in finished]


def pending_runs(runs: Sequence[GridRun]) -> list[GridRun]:
    """The runs without a result; a finished run's identity is checked here, before anything is submitted."""
    pending = []
    for run in runs:
        if read_result(run.finished_file) is None:
            pending.append(run)
        else:
            check_identity(run)
    return pending


def require_submitit() -> Any:
    try:
        import submitit
    except ImportError as err:
        raise UserInputError(
            f"--executor local and slurm run jobs through submitit, which is not installed: {CLUSTER_EXTRA}."
        ) from err
    return submitit


# ---------------------------------------------------------------------------------------------- local


def local_slots(executor: ExecutorSpec) -> list[int | None]:
    """One slot per GPU (`--gpus`, default every visible one), at most `--max_parallel`; CPU processes (None) when
    no GPU is visible."""
    gpus = list(executor.gpus) if executor.gpus is not None else visible_gpus()
    if gpus:
        return gpus[: executor.max_parallel]
    return [None] * (executor.max_parallel or 1)


def visible_gpus() -> list[int]:
    """The GPUs this process may use, as indices a job's CUDA_VISIBLE_DEVICES takes."""
    import torch

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None or not torch.cuda.is_available():
        return list(range(torch.cuda.device_count()))
    entries = [entry.strip() for entry in listed.split(",") if entry.strip()]
    if not all(entry.isdigit() for entry in entries):
        raise UserInputError(
            f"CUDA_VISIBLE_DEVICES={listed} names GPUs by UUID; give --executor local the GPUs as indices: --gpus 0,1."
        )
    return [int(entry) for entry in entries]


def run_local(submitit: Any, pending: list[GridRun], executor: ExecutorSpec, folder: Path) -> dict[str, Path]:
    """A slot scheduler: at most one job per slot at a time, the next run submitted as a slot frees (submitit's local
    executor starts every job at once and pins none unless told). Each job's files are in logs/<run>/; returns each
    run's log."""
    slots = local_slots(executor)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cpu_threads = None if slots[0] is not None else max(1, cores // len(slots))
    queue, running, ended, logs = deque(pending), {}, [], {}
    progress = Progress(len(pending))
    try:
        while queue or running:
            for slot in [slot for slot in range(len(slots)) if slot not in running]:
                if not queue:
                    break
                run = queue.popleft()
                local = submitit.LocalExecutor(folder=folder / LOGS_DIR / run_name(run, folder))
                gpu = slots[slot]
                gpus = {"gpus_per_node": 1, "visible_gpus": (gpu,)} if gpu is not None else {"gpus_per_node": 0}
                local.update_parameters(timeout_min=LOCAL_TIME_LIMIT_MIN, **gpus)
                job = local.submit(RunJob(cpu_threads), run)
                running[slot], logs[run.label] = (run, job), Path(job.paths.stderr)
            progress.show(ended, running=len(running), left=len(queue))
            time.sleep(POLL_S)
            for slot, (_, job) in list(running.items()):
                if job.done():
                    ended.append(running.pop(slot)[0])
        progress.show(ended, running=0, left=0)
    except BaseException:  # Ctrl-C or a bug here: no job is left running without its parent
        for _, job in running.values():
            job.cancel()
        raise
    finally:
        progress.close()
    return logs


# ---------------------------------------------------------------------------------------------- slurm


def run_slurm(submitit: Any, pending: list[GridRun], executor: ExecutorSpec, folder: Path) -> dict[str, Path]:
    """One job array, one GPU per task, then wait for every task; returns each run's log. A run still queued or
    running from an earlier call of the same command (its job id in logs/slurm_jobs.json) is waited for, not
    submitted again."""
    logs, jobs_file = folder / LOGS_DIR / "slurm", OutputFolder(folder / LOGS_DIR)
    recorded = read_result(jobs_file.root / SLURM_JOBS_FILE) or {}
    jobs = {}
    for run in pending:
        if run.label in recorded:
            job = submitit.SlurmJob(folder=logs, job_id=recorded[run.label])
            if job.state.upper() in UNFINISHED_SLURM_STATES:
                jobs[run.label] = job
    to_submit = [run for run in pending if run.label not in jobs]
    if to_submit:
        if shutil.which("srun") is None:
            raise UserInputError(
                "--executor slurm finds no `srun` on PATH: run the command on a SLURM login node (or use --executor "
                "local on one machine)."
            )
        slurm = submitit.SlurmExecutor(folder=logs)
        settings = {"partition": executor.slurm_partition} if executor.slurm_partition else {}
        if executor.slurm_max_concurrent:
            settings["array_parallelism"] = executor.slurm_max_concurrent
        slurm.update_parameters(
            job_name="dpt-peft",
            time=executor.slurm_time_min,
            nodes=1,
            ntasks_per_node=1,
            gpus_per_node=1,
            additional_parameters=dict(executor.slurm_sbatch),
            **settings,
        )
        try:
            submitted = slurm.map_array(RunJob(), to_submit)
        except submitit.core.utils.FailedJobError as err:  # sbatch's own refusal (partition, account, limits)
            message = " ".join(str(err).split())
            raise UserInputError(f"sbatch refused the job array: {message}; check the --slurm_* flags.") from err
        jobs.update({run.label: job for run, job in zip(to_submit, submitted)})
        jobs_file.write_json(SLURM_JOBS_FILE, {**recorded, **{label: job.job_id for label, job in jobs.items()}})
        first = submitted[0].job_id.split("_")[0]
        print(f"Submitted {len(to_submit)} runs as SLURM job {first} (logs: {logs}); cancel with `scancel {first}`.")
    by_label = {run.label: run for run in pending}
    progress = Progress(len(pending))
    try:
        while True:
            ended = [by_label[label] for label, job in jobs.items() if job.done()]
            progress.show(ended, running=len(jobs) - len(ended), left=0)
            if len(ended) == len(jobs):
                break
            time.sleep(10 * POLL_S)
    finally:
        progress.close()
    return {label: Path(job.paths.stderr) for label, job in jobs.items()}


# ---------------------------------------------------------------------------------------------- reporting


class Progress:
    """The parent's progress line: done / running / failed / left."""

    def __init__(self, total: int):
        self.bar = tqdm(total=total, desc="runs", unit="run")

    def show(self, ended: list[GridRun], running: int, left: int) -> None:
        failed = sum(not run.finished_file.exists() for run in ended)
        self.bar.n = len(ended)
        self.bar.set_postfix_str(f"done {len(ended) - failed}, running {running}, failed {failed}, left {left}")

    def close(self) -> None:
        self.bar.close()


def _failure(run: GridRun, log: Path | None) -> RunFailure:
    """Why a run failed: the last line of its log (the error a traceback ends with), or that it left none."""
    try:
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()] if log else []
    except OSError:
        lines = []
    reason = next((line for line in reversed(lines) if line), "no error in its log: killed, out of memory or time?")
    return RunFailure(run.label, reason[:300], log)


def run_name(run: GridRun, folder: Path) -> str:
    """The run's folder relative to the grid's (`dtd/coop/shots1_seed1`, `coop_seed1`): its name under logs/ and
    commands/."""
    return run.finished_file.parent.resolve().relative_to(Path(folder).resolve()).as_posix()


def train_commands(runs: Sequence[GridRun], folder: Path) -> list[str]:
    """`--print_commands`: for each run not yet trained, its settings in `folder`/commands/<run>.json and the
    `dpt-peft train` command that runs it; the grid command, run again afterwards, evaluates and reports them."""
    commands = []
    for run in runs:
        if read_result(run.finished_file) is not None or read_result(run.metrics_file) is not None:
            continue
        written = OutputFolder(folder).write_json(f"{COMMANDS_DIR}/{run_name(run, folder)}.json", run.train_settings())
        commands.append(f"dpt-peft train {shlex.quote(str(written))}")
    return commands
