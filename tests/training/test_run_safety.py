"""Run safety (docs/reliability.md): what a run deletes, its lock, checks before writing, checkpoints that load
nothing executable and are hash-verified, divergence, bad flags, corrupt files, a full disk, unloaded models."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CLASS_NAMES, killed_after_epoch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import CLIPModel

import dpt_peft.training.checkpoints as checkpoints_module
import dpt_peft.training.report as report_module
import dpt_peft.training.setup as training_setup
from dpt_peft import DPTConfig
from dpt_peft.cli import main, train_main
from dpt_peft.training.checkpoint_files import CheckpointError, verify_checkpoint
from dpt_peft.training.run_dir import own_entries
from dpt_peft.training.run_layout import LOCK_FILE
from dpt_peft.training.run_lock import check_lock
from dpt_peft.training.trainer import TrainingDivergedError
from dpt_peft.utils.durable import plain_file_mode, plain_folder_mode
from dpt_peft.utils.write_policy import MANIFEST_FILE, OutputFolder

SHORT = ["--epochs", "2", "--shots", "4", "--report_to", "none", "--eval_batch_size", "300"]
CHECKPOINT_FILES = {
    "adapter/README.md",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "manifest.json",
    "optimizer.json",
    "optimizer.safetensors",
    "rng.json",
    "rng.safetensors",
    "scheduler.json",
    "trainer_state.json",
}


def run(output_dir, *extra: str) -> dict:
    return train_main([*SHORT, "--output_dir", str(output_dir), *extra])


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` with the sha256 of its contents."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def flip_a_byte(path: Path, at: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


class MakesFile:
    """A pickle whose loading creates `path`: proof that it was (or was not) unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> tuple[Path, Path]:
    """A 3-epoch run killed after epoch 1 (checkpoints epoch_0 and epoch_1), and a pristine copy of it."""
    directory = tmp_path_factory.mktemp("killed") / "run"
    with killed_after_epoch(1):
        run(directory, "--epochs", "3")
    pristine = directory.with_name("pristine")
    shutil.copytree(directory, pristine)
    return directory, pristine


@pytest.fixture
def copied_run(killed_run) -> Path:
    """The killed run as it was written, at its own path (run.json records --output_dir)."""
    directory, pristine = killed_run
    shutil.rmtree(directory)
    shutil.copytree(pristine, directory)
    return directory


# ------------------------------------------------------------------------------- 1. deletes only what it wrote


def test_a_directory_holding_a_run_is_never_replaced_silently(copied_run):
    before = snapshot(copied_run)
    with pytest.raises(ValueError, match=r"already holds this run.*--resume_from_checkpoint latest.*--overwrite"):
        run(copied_run, "--epochs", "3")  # the identical command
    with pytest.raises(ValueError, match=r"holds a different run \(shots: 4 -> 3\).*--resume_from_checkpoint latest"):
        run(copied_run, "--epochs", "3", "--shots", "3")
    assert snapshot(copied_run) == before


def test_a_users_file_inside_a_checkpoint_is_never_deleted(copied_run):
    """A whole checkpoint folder was recorded as dpt_peft's, so --overwrite_output_dir deleted a file put into it."""
    notes = copied_run / "checkpoints" / "epoch_0" / "notes.txt"
    notes.write_text("the user's")
    before = snapshot(copied_run)
    for flags in (["--overwrite_output_dir"], ["--resume_from_checkpoint", "latest"]):
        with pytest.raises(ValueError, match=r"but also 'checkpoints/epoch_0/notes.txt', which dpt_peft did not write"):
            run(copied_run, "--epochs", "3", *flags)
    assert snapshot(copied_run) == before
    notes.unlink()
    run(copied_run, "--epochs", "3", "--overwrite_output_dir")  # the run's own files, each recorded, are replaced


def test_overwrite_removes_only_the_runs_own_artifacts(tmp_path):
    out = tmp_path / "run"
    run(out, "--report_to", "tensorboard", "--epochs", "1")
    (out / "eval").mkdir()
    OutputFolder(out / "eval").write_json("eval_metrics.json", {})  # as `dpt-peft evaluate --output_dir run/eval`
    assert {p.name for p in out.iterdir()} == {
        ".dpt_peft.lock",
        MANIFEST_FILE,
        "adapter",
        "checkpoints",
        "dpt_peft",
        "eval",
        "history.json",
        "metrics.json",
        "run.json",
        "training_curve.png",
    }
    old_events = {p.name for p in (out / "dpt_peft").rglob("events.out.tfevents.*")}
    run(out, "--overwrite_output_dir", "--num_visual_tokens", "3", "--epochs", "1")
    assert not (out / "eval").exists()
    assert not old_events & {p.name for p in (out / "dpt_peft").rglob("*")}  # the old tracker logs were removed
    assert json.loads((out / "run.json").read_text())["dpt_config"]["num_visual_tokens"] == 3
    check_lock(out / LOCK_FILE)  # released

    # A file dpt_peft did not write: refused, also with --overwrite_output_dir; nothing is deleted.
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    for flags in ([], ["--overwrite_output_dir"]):
        with pytest.raises(ValueError, match="'notes.txt'.*did not write.*choose another --output_dir") as caught:
            run(out, "--num_visual_tokens", "3", "--epochs", "1", *flags)
        assert "--overwrite_output_dir" not in str(caught.value)  # never recommends deleting the user's files
    assert snapshot(out) == before


def test_output_dir_dot_in_a_project_is_refused_even_with_overwrite(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "dpt_peft").mkdir(parents=True)  # a package named like the tracker's directory
    (project / "dpt_peft" / "__init__.py").write_text("")
    (project / "adapter").mkdir()
    (project / "adapter" / "adapter_config.json").write_text("{}")  # names that dpt_peft also writes
    (project / "README.md").write_text("# mine")
    before = snapshot(project)
    monkeypatch.chdir(project)
    with pytest.raises(ValueError, match=r"--output_dir \. is not empty and holds no dpt_peft run: 'README.md'"):
        train_main([*SHORT, "--output_dir", ".", "--overwrite_output_dir"])
    (project / "README.md").unlink()
    with pytest.raises(ValueError, match=r"'adapter/adapter_config.json' \(and 1 more\).*did not write"):
        train_main([*SHORT, "--output_dir", ".", "--overwrite_output_dir"])
    del before["README.md"]
    assert snapshot(project) == before


HOLD_LOCK = (
    "import sys, time; from pathlib import Path; from dpt_peft.training.run_lock import RunLock; "
    "lock = RunLock.acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)"
)


def test_a_second_concurrent_run_is_refused_until_the_holder_dies(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"Another dpt_peft run is using.*process {other.pid}"):
            run(out)
        assert [p.name for p in out.iterdir()] == [LOCK_FILE]  # nothing written, the lock left to its owner
        with pytest.raises(ValueError, match="Another dpt_peft run"):  # also on a later re-run with overwrite
            run(out, "--overwrite_output_dir")
    finally:
        other.kill()  # kill -9: the kernel releases its lock, nothing to take over by hand
        other.wait()
    run(out, "--epochs", "1")
    assert (out / "metrics.json").exists()
    check_lock(out / LOCK_FILE)  # released when the run ended


def test_the_lock_is_released_when_a_run_fails(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(report_module, "evaluate_split", fail)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run(tmp_path / "run", "--epochs", "1")
    assert (tmp_path / "run" / "run.json").exists()
    check_lock(tmp_path / "run" / LOCK_FILE)  # released


# ------------------------------------------------------------------------------- 2. checks before writing


def test_a_config_the_model_rejects_writes_nothing_and_the_retry_succeeds(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="num_text_tokens=40 leaves no room for a class name"):
        run(out, "--num_text_tokens", "40")
    assert not out.exists()
    with pytest.raises((ValueError, ImportError)):
        run(out, "--attn_implementation", "no_such_attention")
    assert not out.exists()
    run(out, "--epochs", "1")  # the corrected command, in the same directory
    assert (out / "metrics.json").exists()


# ------------------------------------------------------------------------------- 3. nothing that can run code


def test_checkpoints_hold_safetensors_and_json_with_a_manifest(copied_run):
    checkpoint = copied_run / "checkpoints" / "epoch_1"
    assert set(snapshot(checkpoint)) == CHECKPOINT_FILES
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["format"] == "dpt_peft-checkpoint" and set(manifest["files"]) == CHECKPOINT_FILES - {
        "manifest.json"
    }
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((checkpoint / name).read_bytes()).hexdigest() == entry["sha256"]
    optimizer = load_file(checkpoint / "optimizer.safetensors")
    assert optimizer and all(k.endswith(".momentum_buffer") for k in optimizer)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and state["global_step"] == 2


def test_checkpoint_files_get_the_mode_a_plain_write_gives_under_the_umask(killed_run):
    """safetensors writes 0600: a team sharing the run folder could not read the checkpoints' adapters."""
    directory, _ = killed_run
    for path in (directory / "checkpoints").rglob("*"):
        expected = plain_folder_mode() if path.is_dir() else plain_file_mode()
        assert path.stat().st_mode & 0o777 == expected, path


def test_a_planted_pickle_is_never_unpickled(copied_run, tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(MakesFile(probe)))
    assert probe.exists()  # the payload does run when unpickled
    marker = tmp_path / "marker"
    payload = pickle.dumps(MakesFile(marker))
    latest = copied_run / "checkpoints" / "epoch_1"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
        (latest / name).write_bytes(payload)
    # Planted in the run's folder: files dpt_peft did not write, so the folder is refused (and they are never deleted).
    with pytest.raises(ValueError, match=r"but also 'checkpoints/epoch_1/custom_checkpoint_0.pkl' \(and 3 more\)"):
        run(copied_run, "--resume_from_checkpoint", "latest", "--epochs", "3")
    # Resumed from that checkpoint by path into another folder: the pickles are ignored, never opened.
    elsewhere = tmp_path / "resumed"
    run(elsewhere, "--resume_from_checkpoint", str(latest), "--epochs", "3")
    assert json.loads((elsewhere / "metrics.json").read_text())["steps"] == 3
    assert not marker.exists() and (latest / "custom_checkpoint_0.pkl").exists()

    # A checkpoint in Accelerate's pickle format (no manifest) is refused, not loaded.
    legacy = tmp_path / "legacy" / "epoch_0"
    legacy.mkdir(parents=True)
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
        (legacy / name).write_bytes(payload)
    with pytest.raises(CheckpointError, match="pickle-based format.*unpickling a file can run arbitrary code"):
        run(tmp_path / "elsewhere", "--resume_from_checkpoint", str(legacy))
    assert not marker.exists() and not (tmp_path / "elsewhere").exists()


def test_a_flipped_byte_fails_verification_naming_the_file(copied_run):
    checkpoint = copied_run / "checkpoints" / "epoch_1"
    flip_a_byte(checkpoint / "adapter" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors does not match its sha256"):
        verify_checkpoint(checkpoint)
    before = snapshot(copied_run)
    with pytest.raises(CheckpointError, match=r"epoch_1/adapter/adapter_model\.safetensors does not match"):
        run(copied_run, "--resume_from_checkpoint", str(checkpoint), "--epochs", "3")
    assert snapshot(copied_run) == before


def test_latest_skips_a_corrupt_checkpoint_for_the_previous_intact_one(copied_run, tmp_path, caplog):
    straight = tmp_path / "straight"
    run(straight, "--epochs", "3")
    flip_a_byte(copied_run / "checkpoints" / "epoch_1" / "optimizer.safetensors")
    with caplog.at_level(logging.WARNING):
        run(copied_run, "--resume_from_checkpoint", "latest", "--epochs", "3")
    warning = next(r.getMessage() for r in caplog.records if "corrupt checkpoint" in r.getMessage())
    assert "epoch_1" in warning and "optimizer.safetensors" in warning and "resuming from" in warning
    assert warning.rstrip(".").split("resuming from ")[1].startswith(str(copied_run / "checkpoints" / "epoch_0"))
    history = json.loads((copied_run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]
    expected = load_file(straight / "adapter" / "adapter_model.safetensors")
    resumed = load_file(copied_run / "adapter" / "adapter_model.safetensors")
    for key in expected:  # epochs 1 and 2 trained again from epoch 0 give the uninterrupted run's adapter
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6)
    verify_checkpoint(copied_run / "checkpoints" / "epoch_1")  # the corrupt one was replaced by a good one


# ------------------------------------------------------------------------------- 4. divergence


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    flags = ["--visual_lr", "1e12", "--visual_warmup_epochs", "0", "--epochs", "3", "--checkpoints_to_keep", "1"]
    with pytest.raises(TrainingDivergedError, match=r"loss is nan in epoch 1 .*optimizer step 2.*epoch_0, is kept"):
        run(out, *flags)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0"]  # not rotated, no NaN one
    verify_checkpoint(out / "checkpoints" / "epoch_0")
    weights = load_file(out / "checkpoints" / "epoch_0" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
    check_lock(out / LOCK_FILE)  # released


def test_save_pretrained_refuses_non_finite_tensors(clip_path, tmp_path):
    model = get_peft_model(CLIPModel.from_pretrained(clip_path), DPTConfig(class_names=CLASS_NAMES))
    key, (_, parameter) = next(iter(model.base_model.adapter_parameters().items()))
    with torch.no_grad():
        parameter.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=rf"tensor '[^']*{key.split('.')[-1]}' holds 1 NaN or infinite value"):
        model.save_pretrained(str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter").exists()


# ------------------------------------------------------------------------------- 5. checkpoints_to_keep


@pytest.mark.parametrize("keep", ["0", "-1"])
def test_checkpoints_to_keep_below_one_is_refused(tmp_path, keep):
    with pytest.raises(ValueError, match=rf"--checkpoints_to_keep {keep} must be at least 1"):
        run(tmp_path / "run", "--checkpoints_to_keep", keep)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="--overwrite_output_dir deletes the run that --resume_from_checkpoint"):
        run(tmp_path / "run", "--overwrite_output_dir", "--resume_from_checkpoint", "latest")


# ------------------------------------------------------------------------------- 6. corrupt files, full disk


@pytest.mark.parametrize(
    "name, message",
    [
        ("trainer_state.json", r"trainer_state\.json does not match its sha256"),
        ("manifest.json", r"manifest\.json cannot be read .*truncated or corrupt.*resume from another checkpoint"),
    ],
)
def test_a_truncated_checkpoint_file_is_named(copied_run, name, message):
    path = copied_run / "checkpoints" / "epoch_1" / name
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=message):
        run(copied_run, "--resume_from_checkpoint", str(path.parent), "--epochs", "3")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epoch": "abc"}, r"'epoch' is 'abc', not an epoch number"),
        ({"history": "x"}, r"'history' is 'x', not a list of epoch records"),
        ({"global_step": None}, r"'global_step' is None, not a step count"),
    ],
)
def test_a_wrong_typed_trainer_state_is_named_not_a_raw_type_error(copied_run, change, message):
    checkpoint = copied_run / "checkpoints" / "epoch_1"
    state = checkpoint / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), **change}))
    manifest = json.loads((checkpoint / "manifest.json").read_text())  # as if written so: the hashes match
    manifest["files"]["trainer_state.json"]["sha256"] = hashlib.sha256(state.read_bytes()).hexdigest()
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=rf"epoch_1/trainer_state.json: {message}.*resume from another"):
        run(copied_run, "--resume_from_checkpoint", str(checkpoint), "--epochs", "3")


def test_a_truncated_run_file_is_named_with_the_fix(copied_run):
    (copied_run / "run.json").write_text('{"model_name_or_path": nu')
    with pytest.raises(ValueError, match=r"run\.json \(the arguments.*truncated or corrupt; delete it to resume"):
        run(copied_run, "--resume_from_checkpoint", "latest", "--epochs", "3")
    with pytest.raises(ValueError, match=r"run\.json cannot be read .*pass --overwrite_output_dir"):
        run(copied_run)
    run(copied_run, "--overwrite_output_dir", "--epochs", "1")
    assert json.loads((copied_run / "run.json").read_text())["epochs"] == 1


@pytest.mark.parametrize(
    ("epoch", "kept", "advice", "continue_flags"),
    [
        (
            1,
            r"the earlier checkpoints \(epoch_0\) are intact",
            "continue with --resume_from_checkpoint latest",
            ["--resume_from_checkpoint", "latest"],
        ),
        (0, "there is no earlier checkpoint", "train again with --overwrite_output_dir", ["--overwrite_output_dir"]),
    ],
)
def test_a_full_disk_keeps_the_previous_checkpoint_and_names_the_flag_that_continues(
    tmp_path, monkeypatch, capsys, epoch, kept, advice, continue_flags
):
    original = checkpoints_module.write_file

    def full_disk(path, data):
        if f"epoch_{epoch}.partial" in str(path) and path.name == "scheduler.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        original(path, data)

    monkeypatch.setattr(checkpoints_module, "write_file", full_disk)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *SHORT, "--output_dir", str(out), "--epochs", "3"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1].split("\r")[-1]  # one line after the progress bar's
    written = re.escape(str(out / "checkpoints" / f"epoch_{epoch}"))
    assert re.search(rf"dpt-peft: error: Could not write {written}: no space left .*{kept}.*{advice}.*$", error), error
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"epoch_{e}" for e in range(epoch)]  # no partial
    check_lock(out / LOCK_FILE)  # released
    monkeypatch.setattr(checkpoints_module, "write_file", original)
    run(out, "--epochs", "3", *continue_flags)  # the advice works
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3


# ------------------------------------------------------------------------------- 7. unloaded model


def test_an_unloaded_model_refuses_save_and_forward(clip_path, tmp_path, pixel_values):
    model = get_peft_model(CLIPModel.from_pretrained(clip_path), DPTConfig(class_names=CLASS_NAMES)).eval()
    model.unload()
    with pytest.raises(RuntimeError, match=r"Cannot save the adapter: this DPTPeftModel was unloaded"):
        model.save_pretrained(str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter").exists()
    with pytest.raises(RuntimeError, match=r"Cannot run forward: this DPTPeftModel was unloaded.*from_pretrained"):
        model(pixel_values=pixel_values)


def test_a_moved_or_respelled_run_resumes(killed_run, tmp_path, monkeypatch):
    _, pristine = killed_run
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(pristine, moved)  # run.json and the checkpoints record the old --output_dir
    monkeypatch.chdir(moved.parent)
    metrics = run("./run", "--resume_from_checkpoint", "latest", "--epochs", "3")  # relative, and moved
    assert metrics["steps"] == 3
    assert json.loads((moved / "metrics.json").read_text())["steps"] == 3


def test_a_resume_on_changed_data_is_refused_before_anything_is_written(copied_run, monkeypatch):
    import dpt_peft.data.few_shot as few_shot_module

    real = few_shot_module.data_fingerprint
    before = snapshot(copied_run)
    monkeypatch.setattr(training_setup, "data_fingerprint", lambda tasks, *columns: "changed" + real(tasks, *columns))
    with pytest.raises(ValueError, match=r"another config \(data_fingerprint: the training images changed"):
        run(copied_run, "--resume_from_checkpoint", "latest", "--epochs", "3")
    assert snapshot(copied_run) == before


def test_a_run_copied_without_its_hidden_manifest_resumes_and_a_stray_file_is_named(killed_run, tmp_path):
    """`cp -r run/* copy/` skips the hidden manifest: the run's own records (run.json, each checkpoint's manifest)
    still prove its files, and a refusal says what went missing."""
    _, pristine = killed_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for entry in pristine.iterdir():
        if not entry.name.startswith("."):
            (shutil.copytree if entry.is_dir() else shutil.copy)(entry, copy / entry.name)
    (copy / "notes.txt").write_text("the user's")
    with pytest.raises(
        ValueError, match=r"'notes.txt', which dpt_peft did not write \(.*_written.json .*is missing.*cp -r"
    ):
        run(copy, "--resume_from_checkpoint", "latest", "--epochs", "3")
    (copy / "notes.txt").unlink()
    assert run(copy, "--resume_from_checkpoint", "latest", "--epochs", "3")["steps"] == 3
    assert own_entries(copy)[1] == []  # recorded again
