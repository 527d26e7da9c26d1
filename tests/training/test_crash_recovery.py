"""Issue 31: a run killed at any step of writing a checkpoint (docs/reliability.md, "The crash model") leaves a folder
that `--resume_from_checkpoint latest` continues and `--overwrite_output_dir` accepts: nothing in it is of unknown
origin, and the resumed run gives what an uninterrupted one gives. A kill is simulated by raising KeyboardInterrupt
just before a step (the checkpointer's clean-up handles `Exception`, so none of it runs, as after a kill -9); the
write policy's own steps are killed for real in tests/utils/test_crash_consistency.py."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest

import dpt_peft.training.checkpoints as checkpoints_module
from dpt_peft.cli import main, train_main
from dpt_peft.peft_model import DPTPeftModel
from dpt_peft.training.checkpoint_files import verify_checkpoint
from dpt_peft.training.checkpoints import Checkpointer
from dpt_peft.training.run_dir import own_entries
from dpt_peft.utils.write_policy import TEMPORARY_PREFIX, OutputFolder

SHORT = ["--shots", "4", "--report_to", "none", "--eval_batch_size", "300", "--checkpoints_to_keep", "1"]


def run(output_dir: Path, *extra: str) -> dict:
    return train_main([*SHORT, "--output_dir", str(output_dir), *extra])


class Killed(KeyboardInterrupt):
    """The run dies here."""


class KillPoints:
    """Raise `Killed` just before the `occurrence`-th call of step `name` while epoch 1's checkpoint is saved."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, occurrence: int):
        self.name, self.occurrence, self.calls, self.saving = name, occurrence, 0, False
        original_save = Checkpointer.save

        def save(checkpointer, state, identity):
            self.saving = state["epoch"] == 1
            original_save(checkpointer, state, identity)

        monkeypatch.setattr(Checkpointer, "save", save)
        monkeypatch.setattr(checkpoints_module, "write_file", self.wrap("write_file", checkpoints_module.write_file))
        monkeypatch.setattr(checkpoints_module, "os", StepOs(self))
        for method in ("record_hashes", "forget", "remove_owned"):
            monkeypatch.setattr(OutputFolder, method, self.wrap(method, getattr(OutputFolder, method)))

    def wrap(self, name, function):
        def step(*args, **kwargs):
            self.reached(name)
            return function(*args, **kwargs)

        return step

    def reached(self, name: str) -> None:
        if self.saving and name == self.name:
            self.calls += 1
            if self.calls == self.occurrence:
                raise Killed(f"killed before {name} #{self.occurrence}")


class StepOs:
    """The `os` module as the checkpointer sees it, with `os.replace` a kill point."""

    def __init__(self, points: KillPoints):
        self.points = points

    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, source, target):
        self.points.reached("replace")
        os.replace(source, target)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    return run(tmp_path_factory.mktemp("straight") / "run", "--epochs", "3")


@pytest.mark.parametrize(
    ("step", "occurrence", "state"),
    [
        ("write_file", 3, "epoch_1.partial half-written"),
        ("record_hashes", 1, "complete epoch_1.partial, its final names not recorded"),
        ("replace", 1, "epoch_1's files recorded, the folder not renamed"),
        ("forget", 1, "epoch_1 in place, epoch_1.partial still recorded"),
        ("remove_owned", 2, "epoch_0 not yet rotated out (--checkpoints_to_keep 1)"),
    ],
)
def test_a_run_killed_at_any_step_of_a_checkpoint_resumes_or_is_overwritten(
    tmp_path, monkeypatch, uninterrupted, step, occurrence, state
):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        points = KillPoints(patch, step, occurrence)
        with pytest.raises(Killed):
            run(out, "--epochs", "3")
        assert points.calls == occurrence, state
    own, foreign = own_entries(out)
    assert foreign == [], state  # so neither --resume_from_checkpoint nor --overwrite_output_dir is refused
    metrics = run(out, "--resume_from_checkpoint", "latest", "--epochs", "3")
    for key in ("accuracy", "steps", "final_train_loss"):
        assert metrics[key] == pytest.approx(uninterrupted[key], abs=1e-6), (key, state)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch_2"]  # leftovers and old ones removed
    verify_checkpoint(out / "checkpoints" / "epoch_2")
    assert own_entries(out)[1] == [] and not list(out.rglob(f"{TEMPORARY_PREFIX}*"))
    assert json.loads((out / "metrics.json").read_text())["steps"] == uninterrupted["steps"]


def test_a_kill_leaves_temporaries_that_neither_resume_nor_overwrite_refuse(tmp_path):
    """kill -9 while metrics.json or the manifest was written left `.metrics.XXXX.tmp.json`, which made both refuse."""
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Checkpointer, "save", lambda *a: (_ for _ in ()).throw(Killed("killed")))
        with pytest.raises(Killed):
            run(out, "--epochs", "1")
    for name in (f"{TEMPORARY_PREFIX}metrics.abc123.json", f"{TEMPORARY_PREFIX}.dpt_peft_written.x1y2z3.json"):
        (out / name).write_text('{"accur')  # what a kill mid-write leaves
    (out / f"{TEMPORARY_PREFIX}adapter.k9").mkdir()
    (out / f"{TEMPORARY_PREFIX}adapter.k9" / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    assert own_entries(out)[1] == []
    run(out, "--epochs", "1", "--overwrite_output_dir")  # the refusal names this flag: no checkpoint yet
    assert not list(out.rglob(f"{TEMPORARY_PREFIX}*")) and own_entries(out)[1] == []


def failing_final_save(monkeypatch: pytest.MonkeyPatch, error: BaseException):
    """`save_pretrained` of the final adapter (not a checkpoint's) writes a 0-byte config, then fails with `error`."""
    original = DPTPeftModel.save_pretrained

    def save(model, directory, *args, **kwargs):
        if "checkpoints" not in str(directory):
            (Path(directory) / "adapter_config.json").write_bytes(b"")
            raise error
        return original(model, directory, *args, **kwargs)

    monkeypatch.setattr(DPTPeftModel, "save_pretrained", save)
    return original


@pytest.mark.parametrize(
    "error",
    [Killed("kill -9"), OSError(errno.ENOSPC, "No space left on device")],
    ids=["killed", "disk_full"],
)
def test_a_failed_final_adapter_save_leaves_no_half_adapter_and_resumes(tmp_path, monkeypatch, capsys, error):
    """A kill left half a weights file that made resume and overwrite refuse; a full disk a 0-byte adapter_config.json
    and a raw traceback."""
    out = tmp_path / "run"
    original = failing_final_save(monkeypatch, error)
    if isinstance(error, Killed):
        with pytest.raises(Killed):
            run(out, "--epochs", "2")
    else:
        with pytest.raises(SystemExit) as exit_info:
            main(["train", *SHORT, "--output_dir", str(out), "--epochs", "2"])
        assert exit_info.value.code == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.search(
            r"error: Could not write .*adapter: no space left .*--resume_from_checkpoint latest",
            line,
        )
    assert not (out / "adapter").exists() and own_entries(out)[1] == []
    monkeypatch.setattr(DPTPeftModel, "save_pretrained", original)
    assert run(out, "--epochs", "2", "--resume_from_checkpoint", "latest")["steps"] == 2
    assert json.loads((out / "adapter" / "adapter_config.json").read_text()) and own_entries(out)[1] == []
