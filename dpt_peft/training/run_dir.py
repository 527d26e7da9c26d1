"""A run's directory (`RunDir`): the checks before anything is written, what the run owns in it, its identity, and
opening it (under its lock, `run_lock.py`; the names of what it holds are in `run_layout.py`).

The guarantees (docs/reliability.md):

* dpt_peft deletes only what it wrote: what the directory's manifests record with an unchanged sha256
  (`utils/write_policy.py`). A directory holding anything else is refused, also with --overwrite_output_dir.
* A directory that holds a run is never replaced silently: --resume_from_checkpoint or --overwrite_output_dir.
* One run at a time per directory: an OS-level lock on `LOCK_FILE`, released by the kernel when its process dies.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ..utils.durable import sha256_of
from ..utils.write_policy import (
    MANIFEST_FILE,
    OutputFolder,
    OutputRefused,
    UserInputError,
    check_writable_dir,
    read_json,
)
from .run_layout import CHECKPOINTS, LOCK_FILE, MANIFEST, RUN_FILE, checkpoint_dirs, continue_options
from .run_lock import RunLock, check_lock

logger = logging.getLogger(__name__)


def normalized(value) -> object:
    """`value` as it reads back from JSON, so a run's identity compares equal to the one on disk."""
    return json.loads(json.dumps(value, default=str))


# Where the run is, not what it is: a run resumes from ./run, its absolute path, or after its folder was moved.
LOCATION_KEYS = ("output_dir",)
# Arguments that may name local paths: `imgf`, `./imgf` and `imgf/` (or two spellings of one folder) are one path.
PATH_KEYS = ("dataset", "data_root", "split_file", "class_names_file", "model_name_or_path", "tokenizer_name_or_path")
DATA_KEY = "data_fingerprint"  # few_shot.data_fingerprint of the run's training images


def _same_value(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if key not in PATH_KEYS or not isinstance(old, str) or not isinstance(new, str):
        return False
    if os.path.normpath(old) == os.path.normpath(new):
        return True
    return os.path.exists(old) and os.path.exists(new) and os.path.samefile(old, new)


def first_difference(old: Any, new: dict) -> str | None:
    """How two run identities differ (the location, and the spelling of a path, aside): every differing argument, a
    nested one (the config) by its differing keys only, or None when they are one run."""
    if not isinstance(old, dict):
        return f"the recorded arguments are {type(old).__name__}, not a mapping"
    keys = sorted((set(old) | set(new)) - set(LOCATION_KEYS) - {DATA_KEY})
    differences = [line for key in keys for line in _differences(key, old.get(key), new.get(key))]
    if differences:
        more = f"; and {len(differences) - MAX_SHOWN} more" if len(differences) > MAX_SHOWN else ""
        return "; ".join(differences[:MAX_SHOWN]) + more
    if old.get(DATA_KEY) != new.get(DATA_KEY):  # the arguments alone: a cause the user can see comes first
        return (
            f"{DATA_KEY}: the training images changed or were relabelled (files added, removed, moved between "
            "classes or modified)"
        )
    return None


MAX_SHOWN = 5  # differing keys named in a refusal


def _differences(name: str, old: Any, new: Any) -> list[str]:
    """`name: old -> new` for each differing leaf; two mappings (the config) compare key by key."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [line for key in keys for line in _differences(f"{name}.{key}", old.get(key), new.get(key))]
    return [] if _same_value(name.rpartition(".")[2], old, new) else [f"{name}: {old!r} -> {new!r}"]


def check_run_flags(
    output_dir: str | os.PathLike, checkpoints_to_keep: int, overwrite: bool, resume: str | None
) -> None:
    """The output and checkpoint flags that TrainArguments does not check itself."""
    if checkpoints_to_keep < 1:
        raise UserInputError(
            f"--checkpoints_to_keep {checkpoints_to_keep} must be at least 1: the newest checkpoint is what "
            "--resume_from_checkpoint continues from."
        )
    if overwrite and resume:
        raise UserInputError(
            "--overwrite_output_dir deletes the run that --resume_from_checkpoint continues; pass only one of them."
        )
    check_writable_dir(output_dir, "--output_dir")  # before the data loads


def own_entries(output_dir: Path) -> tuple[list[str], list[str]]:
    """The files under `output_dir` that dpt_peft wrote (recorded, unchanged) and the paths of everything else;
    the lock file and the manifests count as neither."""
    folder = OutputFolder(output_dir)
    # run.json is read and compared whole, a checkpoint verified by its own manifest: when one of their files changed
    # since written (truncated, corrupt), those checks name it, and it is the run's to replace.
    mine = {LOCK_FILE, RUN_FILE} if folder.recorded(RUN_FILE) else {LOCK_FILE, *self_recorded(output_dir)}
    damaged = [p for p in folder.unowned(CHECKPOINTS) if folder.recorded(p)]
    foreign = [p for p in folder.unowned() if p not in mine and p not in damaged]
    files = [p.relative_to(output_dir).as_posix() for p in sorted(output_dir.rglob("*")) if p.is_file()]
    own = [p for p in files if Path(p).name not in (LOCK_FILE, MANIFEST_FILE) and p not in foreign]
    return own, foreign


def self_recorded(output_dir: Path) -> list[str]:
    """Where the folder's manifest is missing (`cp -r run/*` skips hidden files), the files that still prove to be
    the run's by its own records: run.json (compared whole with the run's arguments) and each checkpoint file whose
    sha256 its checkpoint's manifest records. A resume or --overwrite_output_dir records them again (`RunDir`)."""
    if (output_dir / MANIFEST_FILE).exists() or not (output_dir / RUN_FILE).is_file():
        return []
    found = [RUN_FILE]
    for checkpoint in checkpoint_dirs(output_dir):
        try:
            files = json.loads((checkpoint / MANIFEST).read_text(encoding="utf-8"))["files"]
            listed = {name: entry["sha256"] for name, entry in files.items() if ".." not in Path(name).parts}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        verified = [
            name
            for name, sha in listed.items()
            if (checkpoint / name).is_file() and sha256_of(checkpoint / name) == sha
        ]
        found += [(checkpoint / name).relative_to(output_dir).as_posix() for name in [MANIFEST, *verified]]
    return found


def check_output_dir(
    output_dir: str | os.PathLike, identity: dict, *, resume: bool, overwrite: bool, holding_lock: bool = False
) -> None:
    """Every refusal about --output_dir, before anything is written (it reads only). `resume`: the run continues
    from a checkpoint (--resume_from_checkpoint); `overwrite`: --overwrite_output_dir."""
    output_dir = Path(output_dir)
    check_writable_dir(output_dir, "--output_dir")
    if not any(output_dir.iterdir()) if output_dir.exists() else True:
        return
    if not holding_lock:
        check_lock(output_dir / LOCK_FILE)
    own, foreign = own_entries(output_dir)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        if (output_dir / RUN_FILE).exists():
            holds, fix = (
                "holds a dpt_peft run, but also",
                f"move {foreign[0]!r} out of it, or choose another --output_dir",
            )
        else:
            holds, fix = "is not empty and holds no dpt_peft run:", "choose another --output_dir (a new or empty one)"
        # A lost manifest explains foreign files only where a run was (a user's own folder never had one).
        why = OutputFolder(output_dir).manifest_problem() if (output_dir / RUN_FILE).exists() else None
        raise OutputRefused(
            f"--output_dir {output_dir} {holds} {foreign[0]!r}{more}, which dpt_peft did not write"
            f"{f' ({why})' if why else ''}. dpt_peft never deletes, or writes among, files it did not write: {fix}."
        )
    run_file = output_dir / RUN_FILE
    if resume:
        if run_file.exists():
            previous = read_json(
                run_file,
                "the arguments of the run in this directory",
                "delete it to resume (each checkpoint records the run's arguments itself).",
            )
            difference = first_difference(previous, identity)
            if difference is not None:
                raise UserInputError(
                    f"--output_dir {output_dir} holds a run made with another config "
                    f"({difference}); resume with the same arguments, or start a new run "
                    "in another --output_dir."
                )
        return
    if overwrite or not own:
        return
    choices = (
        "pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir to delete it (only the files "
        "dpt_peft wrote) and train again, or choose another --output_dir."
    )
    if not run_file.exists():
        raise UserInputError(f"--output_dir {output_dir} holds files of an earlier dpt_peft run; {choices}")
    try:
        previous = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserInputError(
            f"--output_dir {output_dir} holds a dpt_peft run whose {RUN_FILE} cannot be read ({err}; truncated or "
            f"corrupt); pass --overwrite_output_dir to delete it (only the files dpt_peft wrote) and train again, "
            "or choose another --output_dir."
        ) from err
    difference = first_difference(previous, identity)
    if difference is not None:
        raise UserInputError(f"--output_dir {output_dir} holds a different run ({difference}); {choices}")
    raise UserInputError(f"--output_dir {output_dir} already holds this run (the same arguments); {choices}")


# ---------------------------------------------------------------------------------------------- processes


def on_main_process(accelerator: Accelerator, work: Callable[[], Any]) -> Any:
    """`work()` on the main process only; an error it raises is raised on every process (none waits forever)."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = work()
        except Exception as err:
            error = err
    if accelerator.num_processes > 1:
        shared = [error]
        if accelerator.is_main_process and error is not None:
            try:
                pickle.dumps(error)
            except Exception:
                shared = [RuntimeError(f"{type(error).__name__}: {error}")]
        broadcast_object_list(shared)
        if not accelerator.is_main_process:
            error = shared[0]
    if error is not None:
        raise error
    return result


# ---------------------------------------------------------------------------------------------- the run directory


class RunDir:
    """A run's --output_dir, made once per run and handed to everything that writes there (checkpoints, split files,
    reports): its `path`, its write policy `folder` (what is the run's own, atomic recorded writes) and, from `open`
    to `release`, the `lock` the main process holds. `resume`: --resume_from_checkpoint; `overwrite`:
    --overwrite_output_dir."""

    def __init__(self, path: str | os.PathLike, *, resume: bool, overwrite: bool):
        self.path = Path(path)
        self.folder = OutputFolder(self.path)
        self.resume, self.overwrite = resume, overwrite
        self.lock: RunLock | None = None

    def check(self, identity: dict, accelerator: Accelerator) -> None:
        """Every refusal about the directory for the run `identity` (reads only), raised on every process."""
        on_main_process(accelerator, lambda: self._check(identity))

    def open(self, identity: dict, accelerator: Accelerator) -> None:
        """The run's first write, once every check has passed: lock the directory (main process), remove the previous
        run's own files with --overwrite_output_dir and write run.json."""
        self.lock = on_main_process(accelerator, lambda: self._claim(identity))

    def release(self) -> None:
        """Give the lock up (the end of the run, or a failure after `open`)."""
        if self.lock is not None:
            self.lock.release()

    def continue_advice(self) -> str:
        """How to go on after a failure once the directory is open: the flag that continues this run."""
        if continue_options(self.path).get("resume_from_checkpoint"):
            return "continue with --resume_from_checkpoint latest."
        return "train again with --overwrite_output_dir (no checkpoint was written; it removes only this run's files)."

    def write_folder(self, relative: str, save: Callable[[Path], None]) -> Path:
        """A folder a library writes (`save_pretrained` of the adapters) into the run, replaced whole and recorded
        (`OutputFolder.write_folder`): a kill leaves files the checks know as the run's, so the run resumes; a full
        disk leaves the previous folder and says how to continue."""
        return self.folder.write_folder(relative, save, f"free space on that disk, then {self.continue_advice()}")

    def _check(self, identity: dict, holding_lock: bool = False) -> None:
        check_output_dir(self.path, identity, resume=self.resume, overwrite=self.overwrite, holding_lock=holding_lock)

    def _claim(self, identity: dict) -> RunLock:
        self._check(identity)
        self.path.mkdir(parents=True, exist_ok=True)
        lock = RunLock.acquire(self.path)
        try:
            self._check(identity, holding_lock=True)  # unchanged since the first check?
            self.folder.remove_temporaries()  # of a killed run: ours by their names, and no one else writes here now
            self.folder.record(self_recorded(self.path))  # a run copied without its manifest: recorded again
            if self.overwrite:
                if self.folder.recorded(RUN_FILE):  # also when damaged since
                    (self.path / RUN_FILE).unlink(missing_ok=True)
                for removed in [*self.folder.remove_owned(CHECKPOINTS, damaged=True), *self.folder.remove_owned()]:
                    logger.info("--overwrite_output_dir: removed %s", self.path / removed)
            if not (self.path / RUN_FILE).exists():
                self.folder.write_json(RUN_FILE, identity)
        except BaseException:
            lock.release()
            raise
        return lock


def write_file(path: Path, data: bytes) -> None:
    """Write and flush to disk (every checkpoint file but the adapter's goes through here)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
