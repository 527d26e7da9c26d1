"""Issue 31: the crash model of the write policy (docs/reliability.md, "The crash model"). A real kill -9 (SIGKILL of a
forked child: no clean-up code runs) before each step of a write leaves a folder whose checks know every file as
dpt_peft's or the user's: the write is redone, --overwrite_output_dir empties it, and a user's file is never lost.
Two writers into one folder lose no manifest entry."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest

from dpt_peft.utils.durable import WriteFailedError
from dpt_peft.utils.write_policy import PENDING, TEMPORARY_PREFIX, OutputFolder, read_json

# The file-system steps of a write: a kill before any of them is a kill point.
STEPS = ("replace", "rename", "fsync", "unlink", "rmdir")


def in_child(work: Callable[[], None], kill_at: int | None = None) -> int:
    """Run `work` in a forked child; with `kill_at`, the child SIGKILLs itself just before its `kill_at`-th file-system
    step. Returns the number of steps the child took (when not killed) or -1 (killed)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read_end)
        steps = 0
        originals = {name: getattr(os, name) for name in STEPS}

        def step(name):
            def counted(*args, **kwargs):
                nonlocal steps
                steps += 1
                if steps == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return originals[name](*args, **kwargs)

            return counted

        try:
            with mock.patch.multiple(os, **{name: step(name) for name in STEPS}):
                work()
            os.write(write_end, str(steps).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        reported = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return -1
    assert os.WEXITSTATUS(status) == 0 and reported, "the child failed"
    return int(reported)


def write_metrics(folder: OutputFolder) -> None:
    def half_flushed(temporary: Path) -> None:
        with open(temporary, "w") as f:
            f.write('{"accuracy": ')
            f.flush()
            os.fsync(f.fileno())  # a kill point with half of the file written
            f.write("0.9}")

    folder.write("metrics.json", half_flushed)


def save_adapter(folder: OutputFolder) -> None:
    def save_pretrained(directory: Path) -> None:  # as PEFT does: several files, one of them large
        (directory / "adapter_config.json").write_text(json.dumps({"new": True}))
        with open(directory / "adapter_model.safetensors", "wb") as f:
            f.write(b"\0" * 50_000)
            os.fsync(f.fileno())
            f.write(b"\1" * 50_000)
        (directory / "README.md").write_text("card")

    folder.write_folder("adapter", save_pretrained, "run it again.")


def earlier_run(root: Path) -> OutputFolder:
    """A folder with files dpt_peft wrote (an earlier metrics.json and adapter) and a user's file."""
    folder = OutputFolder(root)
    folder.write_json("metrics.json", {"accuracy": 0.5})
    folder.write_folder("adapter", lambda d: (d / "adapter_config.json").write_text("{}"), "run it again.")
    (root / "notes.txt").write_text("the user's")
    return folder


@pytest.mark.parametrize("write", [write_metrics, save_adapter], ids=["one_file", "adapter_folder"])
def test_a_kill_before_any_step_of_a_write_leaves_a_folder_that_is_redone_or_overwritten(tmp_path, write):
    steps = in_child(lambda: write(earlier_run(tmp_path / "dry")))
    setup_steps = in_child(lambda: earlier_run(tmp_path / "setup"))
    assert steps > setup_steps > 0
    for kill_at in range(setup_steps + 1, steps + 1):
        root = tmp_path / f"killed_{kill_at}"
        assert in_child(lambda root=root: write(earlier_run(root)), kill_at) == -1
        folder = OutputFolder(root)
        assert folder.unowned() == ["notes.txt"], (kill_at, folder.unowned())  # resume and overwrite accept it
        copy = tmp_path / f"overwritten_{kill_at}"
        shutil.copytree(root, copy, symlinks=True)
        write(folder)  # redone: the command run again
        assert OutputFolder(root).unowned() == ["notes.txt"]
        assert (root / "notes.txt").read_text() == "the user's"
        assert OutputFolder(copy).remove_owned() and sorted(os.listdir(copy)) == ["notes.txt"]  # overwritten


def test_a_failed_write_leaves_the_previous_files_and_their_records(tmp_path):
    folder = earlier_run(tmp_path)
    before = folder.manifest()

    def disk_full(directory: Path) -> None:
        (directory / "adapter_config.json").write_bytes(b"")  # what a full disk left before
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteFailedError, match=r"adapter: no space left on that disk .*was kept; run it again") as err:
        folder.write_folder("adapter", disk_full, "run it again.")
    assert err.value.errno == errno.ENOSPC
    with pytest.raises(WriteFailedError, match=r"metrics.json: no space .*metrics.json is as it was"):
        folder.write("metrics.json", lambda t: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    assert folder.manifest() == before and folder.unowned() == ["notes.txt"]
    assert (tmp_path / "adapter" / "adapter_config.json").read_text() == "{}"  # never a 0-byte config
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(TEMPORARY_PREFIX)]


def test_an_interrupted_folder_write_is_pending_never_foreign_and_a_users_file_is_never_taken(tmp_path):
    folder = earlier_run(tmp_path)
    (tmp_path / "adapter" / "mine.txt").write_text("the user's")  # put into our folder since
    with pytest.raises(ValueError, match=r"adapter holds 'adapter/mine.txt', which dpt_peft did not write"):
        save_adapter(folder)
    (tmp_path / "adapter" / "mine.txt").unlink()

    def killed(directory: Path) -> None:
        (directory / "adapter_config.json").write_text("{}")
        raise KeyboardInterrupt  # Ctrl-C: the temporary folder is removed, the old adapter kept

    with pytest.raises(KeyboardInterrupt):
        folder.write_folder("adapter", killed, "run it again.")
    assert folder.manifest()["adapter/adapter_config.json"] != PENDING and folder.unowned() == ["notes.txt"]


def _record_many(root: str, name: str, count: int, barrier) -> None:
    folder = OutputFolder(root)
    barrier.wait()
    for i in range(count):
        folder.write_text(f"{name}_{i}.txt", name)


def test_two_writers_into_one_folder_lose_no_manifest_entry(tmp_path):
    """Before the lock, 105 of 400 entries were lost; two `visualize` into one folder lost 1 of 40."""
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    writers = [context.Process(target=_record_many, args=(str(tmp_path), n, 40, barrier)) for n in ("a", "b")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0
    manifest = OutputFolder(tmp_path).manifest()
    assert sorted(manifest) == sorted(f"{n}_{i}.txt" for n in ("a", "b") for i in range(40))
    assert OutputFolder(tmp_path).unowned() == []


def test_an_input_is_never_an_output_whatever_the_flags(tmp_path):
    photo = tmp_path / "photos" / "cat.png"
    photo.parent.mkdir()
    photo.write_bytes(b"a photo")
    (tmp_path / "link.png").symlink_to(photo)
    for inputs in ([photo], [tmp_path / "link.png"]):
        with pytest.raises(ValueError, match=r"cat.png is one of this command's inputs.*whatever the flags"):
            OutputFolder(photo.parent).check(["cat.png"], "--overwrite_output_dir", overwrite=True, inputs=inputs)
    assert photo.read_bytes() == b"a photo"


def test_yaml_aliases_and_oversized_settings_are_refused_before_they_expand(tmp_path):
    bomb = tmp_path / "bomb.yaml"  # 9 levels of 9 aliases: 387 million strings once expanded
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    bomb.write_text("\n".join(lines))
    assert bomb.stat().st_size < 1000
    with pytest.raises(ValueError, match=r"bomb.yaml \(settings\) is refused: line 2 has a YAML alias"):
        read_json(bomb, "settings", "write values out.")
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"x": "y" * 2000}))
    with pytest.raises(ValueError, match=r"big.json \(settings\) is refused: it is over 1000 bytes"):
        read_json(big, "settings", "fix it.", max_bytes=1000)
