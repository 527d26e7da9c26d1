"""Grids beyond one process (`--executor local|slurm`, `--print_commands`), offline: local jobs on CPU slots, and
submitit's SLURM executor against a faked `sbatch` that runs the array's tasks on this machine."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import sys

import pytest
from coop_layouts import DIRECTORIES, make_layout

import dpt_peft.experiments.benchmark as benchmark_module
import dpt_peft.experiments.executors as executors
import dpt_peft.experiments.grid as grid_module
from dpt_peft.cli import benchmark_main, parse_args, train_main
from dpt_peft.experiments.benchmark import GridSpec, checked_runs
from dpt_peft.experiments.executors import ExecutorSpec, GridRunsFailed, execute
from dpt_peft.utils.errors import UserInputError

SMALL = ["--epochs", "1", "--batch_size", "4", "--eval_batch_size", "64", "--num_text_tokens", "1"]
SHORT_TEMPLATE = ["--zero_shot_template", "{}."]  # the tiny CLIP's text encoder has 24 positions
RUN = ("coop", "shots1_seed1")


def grid_argv(tmp_path, clip_path, out: str, datasets: list[str], *flags: str) -> list[str]:
    return [
        *("--protocol", "few_shot", "--data_root", str(tmp_path / "data"), "--output_dir", str(tmp_path / out)),
        *("--datasets", *datasets, "--shots", "1", "--seeds", "1", "--methods", "coop"),
        *("--model_name_or_path", clip_path, *flags, *SMALL, *SHORT_TEMPLATE),
    ]


def run_dir(tmp_path, out: str, dataset: str):
    return tmp_path / out / "few_shot" / dataset / RUN[0] / RUN[1]


def numbers(tmp_path, out: str, dataset: str) -> dict:
    """A run's result and its training metrics, the numbers only."""
    folder = run_dir(tmp_path, out, dataset)
    result = json.loads((folder / "result.json").read_text())
    metrics = json.loads((folder / "train" / "metrics.json").read_text())
    values = {**result, **{f"train.{k}": v for k, v in metrics.items()}}
    timings = ("seconds", "per_s", "time")
    return {
        k: v
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not any(t in k for t in timings)
    }


def test_local_jobs_give_the_sequential_numbers_survive_a_failed_run_and_redo_only_it(tmp_path, clip_path, monkeypatch):
    for name in ("oxford_pets", "dtd"):
        make_layout(tmp_path / "data", name)
    datasets = ["oxford_pets", "dtd"]
    benchmark_main(grid_argv(tmp_path, clip_path, "sequential", datasets))

    # dtd's images vanish after the parent's data check: its job fails, the other finishes beside it.
    images = tmp_path / "data" / DIRECTORIES["dtd"][0] / DIRECTORIES["dtd"][1]
    checked = benchmark_module.require_data

    def check_then_lose_images(*args):
        checked(*args)
        images.rename(images.with_name("moved"))

    local = grid_argv(tmp_path, clip_path, "local", datasets, "--executor", "local", "--max_parallel", "2")
    with monkeypatch.context() as patch:
        patch.setattr(benchmark_module, "require_data", check_then_lose_images)
        with pytest.raises(GridRunsFailed, match=r"1 of 2 runs failed") as failed:
            benchmark_main(local)
    [failure] = failed.value.failures
    assert failure.label == "few_shot/dtd/coop/shots1_seed1" and failure.log.is_file()
    assert "MissingInputError" in failure.reason and "log: " + str(failure.log) in str(failed.value)
    assert numbers(tmp_path, "local", "oxford_pets") == pytest.approx(numbers(tmp_path, "sequential", "oxford_pets"))
    report = (tmp_path / "local" / "few_shot" / "results.md").read_text()  # the report of what finished
    assert "| oxford_pets | coop | 1 |" in report and "| dtd |" not in report

    images.with_name("moved").rename(images)
    benchmark_main(local)  # the same command again: only the failed run is submitted
    assert numbers(tmp_path, "local", "dtd") == pytest.approx(numbers(tmp_path, "sequential", "dtd"))
    logs = tmp_path / "local" / "few_shot" / "logs"
    assert len(list((logs / "oxford_pets" / RUN[0] / RUN[1]).glob("*_log.err"))) == 1
    assert len(list((logs / "dtd" / RUN[0] / RUN[1]).glob("*_log.err"))) == 2
    for name in ("results.md", "results.csv"):  # the same, but for the training times
        assert without_times(tmp_path / "local" / "few_shot" / name) == without_times(
            tmp_path / "sequential" / "few_shot" / name
        )


def without_times(report) -> list[str]:
    """A report's lines without what measures time: the train_seconds rows of results.csv, results.md's time column."""
    lines = [line for line in report.read_text().splitlines() if ",train_seconds," not in line]
    header = next((line.split(" | ") for line in lines if "train time per run (s)" in line), None)
    if header is None:
        return lines
    column = header.index("train time per run (s)")
    return [" | ".join(cell for i, cell in enumerate(line.split(" | ")) if i != column) for line in lines]


FAKE_SBATCH = """#!/bin/sh
# sbatch without a cluster: keeps the script and answers as sbatch does; no task runs, and sacct calls them FAILED.
if [ -n "$FAKE_SBATCH_REFUSES" ]; then echo "sbatch: error: $FAKE_SBATCH_REFUSES" >&2; exit 1; fi
cat "$1" >> "$FAKE_SBATCH_SCRIPTS"; echo "#END" >> "$FAKE_SBATCH_SCRIPTS"
echo "Submitted batch job 42"
"""
FAKE_SACCT = """#!/bin/sh
printf 'JobID|State|NodeList\\n42_0|FAILED|node1\\n42_1|FAILED|node2\\n'
"""


def fake_slurm(tmp_path, monkeypatch):
    """`sbatch`, `sacct` and `srun` (whose presence submitit checks) on PATH; returns the file of sbatch's scripts."""
    bin_dir = tmp_path / "fake_slurm"
    bin_dir.mkdir()
    for tool, text in (("sbatch", FAKE_SBATCH), ("sacct", FAKE_SACCT), ("srun", "#!/bin/sh\nexit 1\n")):
        (bin_dir / tool).write_text(text)
        (bin_dir / tool).chmod((bin_dir / tool).stat().st_mode | stat.S_IEXEC)
    scripts = tmp_path / "sbatch_scripts.txt"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SBATCH_SCRIPTS", str(scripts))
    monkeypatch.setattr(executors, "POLL_S", 0.1)
    return scripts


def test_slurm_submits_one_array_with_one_gpu_per_task_and_names_the_failed_tasks(tmp_path, clip_path, monkeypatch):
    scripts = fake_slurm(tmp_path, monkeypatch)
    make_layout(tmp_path / "data", "oxford_pets")
    slurm = (
        *("--executor", "slurm", "--slurm_time_min", "90", "--slurm_partition", "gpu"),
        *("--slurm_max_concurrent", "1", "--slurm_sbatch", "account=proj", "cpus-per-task=8"),
    )
    argv = grid_argv(tmp_path, clip_path, "out", ["oxford_pets"], *slurm)
    argv[argv.index("--seeds") + 1 : argv.index("--seeds") + 2] = ["1", "2"]
    with pytest.raises(GridRunsFailed, match="2 of 2 runs failed") as failed:
        benchmark_main(argv)

    [script] = scripts.read_text().split("#END\n")[:-1]
    for line in ("--array=0-1%1", "--gpus-per-node=1", "--ntasks-per-node=1", "--time=90", "--partition=gpu"):
        assert f"#SBATCH {line}\n" in script
    assert "#SBATCH --account=proj\n" in script and "#SBATCH --cpus-per-task=8\n" in script
    assert "#SBATCH --signal=USR2@" in script  # before the time limit: checkpoint and requeue
    logs = tmp_path / "out" / "few_shot" / "logs"
    assert json.loads((logs / "slurm_jobs.json").read_text()) == {
        "few_shot/oxford_pets/coop/shots1_seed1": "42_0",
        "few_shot/oxford_pets/coop/shots1_seed2": "42_1",
    }
    assert [f.log for f in failed.value.failures] == [logs / "slurm" / f"42_{task}_0_log.err" for task in (0, 1)]
    assert not (tmp_path / "out" / "few_shot" / "results.md").exists()  # nothing finished, nothing to report
    with pytest.raises(GridRunsFailed):
        benchmark_main(argv)  # the recorded jobs ended (FAILED): their runs are submitted again
    assert len(scripts.read_text().split("#END\n")) == 3
    monkeypatch.setenv("FAKE_SBATCH_REFUSES", "invalid partition specified: gpu")
    with pytest.raises(UserInputError, match="sbatch refused the job array: sbatch: error: invalid partition"):
        benchmark_main(argv)


def test_print_commands_gives_the_train_call_the_grid_would_make(tmp_path, clip_path, monkeypatch, capsys):
    make_layout(tmp_path / "data", "oxford_pets")
    argv = grid_argv(tmp_path, clip_path, "out", ["oxford_pets"], "--epochs", "2")
    [command] = benchmark_main([*argv, "--print_commands"])
    assert command in capsys.readouterr().out and command.startswith("dpt-peft train ")
    settings = command.removeprefix("dpt-peft train ")
    assert settings == str(tmp_path / "out" / "few_shot" / "commands" / "oxford_pets" / "coop" / "shots1_seed1.json")
    args, overrides = parse_args([settings])
    [run] = checked_runs(_grid_of(argv))
    assert dataclasses.asdict(args) == dataclasses.asdict(run.args) and overrides == run.config_overrides

    train_main([settings])  # the user's scheduler runs it; the grid command then only evaluates and reports
    monkeypatch.setattr(grid_module, "train", lambda *a: pytest.fail("trained again"))
    assert benchmark_main(argv).endswith("results.md")
    assert benchmark_main([*argv, "--print_commands"]) == []


def _grid_of(argv: list[str]) -> GridSpec:
    """The GridSpec `benchmark_main` builds from `argv`."""
    from dpt_peft.cli.parsers import benchmark_parser
    from dpt_peft.cli.train_args import parse_given_flags

    args, extra = benchmark_parser().parse_known_args(argv)
    options, config_options = parse_given_flags(extra)
    fields = ("protocol", "data_root", "output_dir", "datasets", "shots", "seeds", "methods", "model_name_or_path")
    return GridSpec(**{name: getattr(args, name) for name in fields}, options=options, config_options=config_options)


def test_executor_flags_are_checked_and_submitit_is_optional(tmp_path, monkeypatch):
    with pytest.raises(UserInputError, match="--executor slurm needs --slurm_time_min"):
        ExecutorSpec("slurm")
    with pytest.raises(UserInputError, match="--gpus applies to --executor local only"):
        ExecutorSpec("slurm", gpus=(0,), slurm_time_min=60)
    with pytest.raises(UserInputError, match="--slurm_partition applies to --executor slurm only"):
        ExecutorSpec("local", slurm_partition="gpu")
    with pytest.raises(UserInputError, match="--max_parallel 0 must be at least 1"):
        ExecutorSpec("local", max_parallel=0)
    assert executors.local_slots(ExecutorSpec("local", gpus=(2, 3, 5), max_parallel=2)) == [2, 3]
    monkeypatch.setattr(executors, "visible_gpus", lambda: [])  # a CPU machine: processes, one unless told
    assert executors.local_slots(ExecutorSpec("local")) == [None]
    assert executors.local_slots(ExecutorSpec("local", max_parallel=2)) == [None, None]
    run = grid_module.GridRun.make("run", {"output_dir": str(tmp_path / "run")}, {}, {})
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(UserInputError, match=r"pip install 'dpt-peft\[cluster\]'"):
        execute([run], ExecutorSpec("local"), tmp_path)


class FakeLocalExecutor:
    """submitit's LocalExecutor as the slot scheduler uses it: each job is done at its second poll."""

    submitted: list[tuple[str, dict]] = []
    busy: set[int] = set()

    def __init__(self, folder):
        self.folder = folder

    def update_parameters(self, **parameters):
        self.parameters = parameters

    def submit(self, job, run):
        [gpu] = self.parameters["visible_gpus"]
        assert gpu not in self.busy, f"two runs on GPU {gpu}"
        self.busy.add(gpu)
        self.submitted.append((run.label, self.parameters))
        executor, polls = self, []

        class Job:
            paths = type("Paths", (), {"stderr": self.folder / "1_0_log.err"})

            def done(self):
                polls.append(1)
                if len(polls) == 2:
                    executor.busy.discard(gpu)
                return len(polls) >= 2

        return Job()


def test_local_jobs_take_one_gpu_each_and_wait_for_a_free_one(tmp_path, monkeypatch):
    monkeypatch.setattr(executors, "POLL_S", 0)
    runs = [grid_module.GridRun.make(f"run{i}", {"output_dir": str(tmp_path / f"run{i}")}, {}, {}) for i in range(5)]
    fake_submitit = type("submitit", (), {"LocalExecutor": FakeLocalExecutor})
    logs = executors.run_local(fake_submitit, runs, ExecutorSpec("local", gpus=(3, 5)), tmp_path)
    assert [label for label, _ in FakeLocalExecutor.submitted] == [f"run{i}" for i in range(5)]
    assert {parameters["visible_gpus"] for _, parameters in FakeLocalExecutor.submitted} == {(3,), (5,)}
    assert all(
        p["gpus_per_node"] == 1 and p["timeout_min"] == executors.LOCAL_TIME_LIMIT_MIN
        for _, p in FakeLocalExecutor.submitted
    )
    assert logs["run0"] == tmp_path / "logs" / "run0" / "1_0_log.err"
