"""A run's directory: what the project owns in it, its identity, and its lock.

The guarantees (docs/reliability.md):

* dpt_peft deletes only what it wrote. A directory holding anything else is refused, also with
  --overwrite_output_dir, which removes only the run's own artifacts (`OWN_FILES`, `OWN_DIRS`, eval dirs).
* A directory that holds a run is never replaced silently: --resume_from_checkpoint or --overwrite_output_dir.
* One run at a time per directory: `LOCK_FILE` (pid, host, start time), taken over when its process is gone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from .arguments import TrainArguments

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
LOCK_FILE = ".dpt_peft.lock"
TRACKER_DIR = "dpt_peft"  # Accelerate's TensorBoard tracker writes <project_dir>/<this project name>/
CHECKPOINT_FORMAT = "dpt_peft-checkpoint"
CHECKPOINT_VERSION = 1

# Everything a run writes into its --output_dir; nothing else is ever deleted.
OWN_FILES = {RUN_FILE, RUN_FILE + ".tmp", "metrics.json", "history.json", "training_curve.png", LOCK_FILE}
ADAPTER_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors"}
EVAL_FILES = {"eval_metrics.json", "per_class_accuracy.png"}  # `dpt-peft evaluate --output_dir <run>/<dir>`
CHECKPOINT_FILES = {
    MANIFEST,
    STATE_FILE,
    "optimizer.safetensors",
    "optimizer.json",
    "scheduler.json",
    "rng.json",
    "rng.safetensors",
    "scaler.json",
}
# What checkpoints of dpt_peft before issue 12 held (Accelerate's save_state); deleted, never loaded.
LEGACY_CHECKPOINT_FILE = re.compile(
    r"(optimizer|scheduler|sampler|dl_state_dict)(_\d+)?\.bin|custom_checkpoint_\d+\.pkl|random_states_\d+\.pkl|"
    r"scaler\.pt|model(_\d+)?\.safetensors"
)
CHECKPOINT_DIR = re.compile(r"epoch_(\d+)")
TEMPORARY_CHECKPOINT_DIR = re.compile(r"epoch_\d+\.(partial|old)")
REQUIRED_CHECKPOINT_FILES = (
    "adapter/adapter_model.safetensors",
    "optimizer.safetensors",
    "optimizer.json",
    "scheduler.json",
    "rng.json",
    "rng.safetensors",
    STATE_FILE,
)
STATE_KEYS = ("epoch", "global_step", "history", "train_seconds", "run")


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or read: the message names the file and what to do."""


def normalized(value) -> object:
    """`value` as it reads back from JSON, so a run's identity compares equal to the one on disk."""
    return json.loads(json.dumps(value, default=str))


def first_difference(old: dict, new: dict) -> str:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return "none"


def read_json(path: Path, what: str, fix: str) -> Any:
    """JSON from `path`; an unreadable or truncated file is an error naming it and the fix."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} ({what}) cannot be read: {err}. The file is truncated or corrupt; {fix}") from err


# ---------------------------------------------------------------------------------------------- checks


def check_arguments(args: TrainArguments) -> None:
    """The output and checkpoint flags that TrainArguments does not check itself."""
    if args.checkpoints_to_keep < 1:
        raise ValueError(
            f"--checkpoints_to_keep {args.checkpoints_to_keep} must be at least 1: the newest checkpoint is what "
            "--resume_from_checkpoint continues from."
        )
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        raise ValueError(
            "--overwrite_output_dir deletes the run that --resume_from_checkpoint continues; pass only one of them."
        )
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file, not a directory; choose another --output_dir.")


def _matches_only(directory: Path, allowed: Callable[[Path], bool]) -> str | None:
    """The first entry under `directory` that `allowed` rejects (symbolic links always), or None."""
    for path in sorted(directory.rglob("*")):
        if path.is_symlink() or not (path.is_dir() or allowed(path.relative_to(directory))):
            return str(path.relative_to(directory))
    return None


def _is_checkpoint_file(relative: Path) -> bool:
    parts = relative.parts
    if not (CHECKPOINT_DIR.fullmatch(parts[0]) or TEMPORARY_CHECKPOINT_DIR.fullmatch(parts[0])):
        return False
    if len(parts) == 2:
        return parts[1] in CHECKPOINT_FILES or bool(LEGACY_CHECKPOINT_FILE.fullmatch(parts[1]))
    return len(parts) == 3 and parts[1] == "adapter" and parts[2] in ADAPTER_FILES


OWN_DIRS: dict[str, Callable[[Path], bool]] = {
    "adapter": lambda p: len(p.parts) == 1 and p.name in ADAPTER_FILES,
    "best_adapter": lambda p: len(p.parts) == 1 and p.name in ADAPTER_FILES,
    "splits": lambda p: len(p.parts) == 1 and p.suffix == ".json",
    CHECKPOINTS: _is_checkpoint_file,
    TRACKER_DIR: lambda p: len(p.parts) <= 2 and (p.name.startswith("events.out.tfevents.") or p.name == "hparams.yml"),
}


def _foreign_entry(entry: Path) -> str | None:
    """None when dpt_peft wrote `entry` (a direct child of an output dir), else the path that it did not write."""
    if entry.is_symlink():
        return entry.name
    if entry.is_file():
        return None if entry.name in OWN_FILES else entry.name
    if not entry.is_dir():
        return entry.name
    if entry.name in OWN_DIRS:
        inner = _matches_only(entry, OWN_DIRS[entry.name])
        return None if inner is None else f"{entry.name}/{inner}"
    files = [p for p in entry.iterdir()]
    if files and all(p.is_file() and not p.is_symlink() and p.name in EVAL_FILES for p in files):
        return None  # an evaluation written into the run directory
    return entry.name


def own_entries(output_dir: Path) -> tuple[list[Path], list[str]]:
    """The direct children of `output_dir` that dpt_peft wrote, and the paths of those it did not write."""
    own, foreign = [], []
    for entry in sorted(output_dir.iterdir()):
        found = _foreign_entry(entry)
        if found is None:
            own.append(entry)
        else:
            foreign.append(found)
    return own, foreign


def check_output_dir(args: TrainArguments, identity: dict, holding_lock: bool = False) -> None:
    """Every refusal about --output_dir, before anything is written (it reads only)."""
    output_dir = Path(args.output_dir)
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return
    if not holding_lock:
        _check_lock(output_dir / LOCK_FILE)
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
        raise ValueError(
            f"--output_dir {output_dir} {holds} {foreign[0]!r}{more}, which dpt_peft did not write. dpt_peft never "
            f"deletes, or writes among, files it did not write: {fix}."
        )
    run_file = output_dir / RUN_FILE
    if args.resume_from_checkpoint:
        if run_file.exists():
            previous = read_json(
                run_file,
                "the arguments of the run in this directory",
                "delete it to resume (each checkpoint records the run's arguments itself).",
            )
            if previous != identity:
                raise ValueError(
                    f"--output_dir {output_dir} holds a run made with another config "
                    f"({first_difference(previous, identity)}); resume with the same arguments, or start a new run "
                    "in another --output_dir."
                )
        return
    if args.overwrite_output_dir or not [e for e in own if e.name != LOCK_FILE]:
        return
    choices = (
        "pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir to delete it (only the files "
        "dpt_peft wrote) and train again, or choose another --output_dir."
    )
    if not run_file.exists():
        raise ValueError(f"--output_dir {output_dir} holds files of an earlier dpt_peft run; {choices}")
    try:
        previous = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"--output_dir {output_dir} holds a dpt_peft run whose {RUN_FILE} cannot be read ({err}; truncated or "
            f"corrupt); pass --overwrite_output_dir to delete it (only the files dpt_peft wrote) and train again, "
            "or choose another --output_dir."
        ) from err
    if previous != identity:
        raise ValueError(
            f"--output_dir {output_dir} holds a different run ({first_difference(previous, identity)}); {choices}"
        )
    raise ValueError(f"--output_dir {output_dir} already holds this run (the same arguments); {choices}")


# ---------------------------------------------------------------------------------------------- lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except (OSError, OverflowError):
        return False
    return True


def _lock_holder(path: Path) -> dict | None:
    """The lock's contents, None when there is no lock; an unreadable lock counts as held."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as err:
        return {"unreadable": str(err)}
    try:
        holder = json.loads(text)
        if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int) or holder["pid"] <= 0:
            raise ValueError("no valid pid")
        return holder
    except ValueError as err:
        return {"unreadable": f"not a dpt_peft lock ({err})"}


def _is_stale(holder: dict) -> bool:
    """True when the holder ran on this host and its process is gone; a lock from another host is trusted."""
    return holder.get("hostname") == socket.gethostname() and not _pid_alive(holder["pid"])


def _check_lock(path: Path) -> None:
    holder = _lock_holder(path)
    if holder is None or ("unreadable" not in holder and _is_stale(holder)):
        return
    if "unreadable" in holder:
        who = f"an unreadable lock ({holder['unreadable']})"
    else:
        who = f"process {holder['pid']} on {holder.get('hostname')!r}, started {holder.get('started')}"
    raise ValueError(
        f"Another dpt_peft run is using --output_dir {path.parent}: {path} is held by {who}. Wait for it to finish "
        f"or choose another --output_dir; if no run is using this directory (e.g. its machine crashed), delete "
        f"{path}."
    )


@dataclasses.dataclass
class RunLock:
    """The lock file of an output dir, held by this process (the main one) until `release`."""

    path: Path
    token: str

    @classmethod
    def acquire(cls, output_dir: Path) -> RunLock:
        path = output_dir / LOCK_FILE
        holder = _lock_holder(path)
        if holder is not None:
            _check_lock(path)  # raises unless stale
            logger.warning(
                "Taking over the stale lock %s of process %s (started %s), which no longer runs on this host.",
                path,
                holder.get("pid"),
                holder.get("started"),
            )
            path.unlink(missing_ok=True)
        token = uuid.uuid4().hex
        content = {
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "token": token,
        }
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            _check_lock(path)  # another run took it in between
            raise
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(content, f)
            f.flush()
            os.fsync(f.fileno())
        return cls(path, token)

    def release(self) -> None:
        """Remove the lock if it is still ours (never another run's)."""
        holder = _lock_holder(self.path)
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)


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


# ---------------------------------------------------------------------------------------------- output dir


def prepare_output_dir(args: TrainArguments, identity: dict, accelerator: Accelerator) -> RunLock | None:
    """Lock --output_dir, remove the previous run's artifacts with --overwrite_output_dir, and write run.json.

    Called once every check has passed; returns the lock on the main process (None on the others).
    """

    def prepare() -> RunLock:
        output_dir = Path(args.output_dir)
        check_output_dir(args, identity)
        output_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock.acquire(output_dir)
        try:
            check_output_dir(args, identity, holding_lock=True)  # unchanged since it was taken?
            if args.overwrite_output_dir:
                own, _ = own_entries(output_dir)
                for entry in own:
                    if entry.name == LOCK_FILE:
                        continue
                    logger.info("--overwrite_output_dir: removing %s", entry)
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            run_file = output_dir / RUN_FILE
            if not run_file.exists():
                temporary = run_file.with_name(RUN_FILE + ".tmp")
                write_file(temporary, json.dumps(identity, indent=2).encode())
                os.replace(temporary, run_file)
        except BaseException:
            lock.release()
            raise
        return lock

    return on_main_process(accelerator, prepare)


def write_file(path: Path, data: bytes) -> None:
    """Write and flush to disk (every checkpoint file but the adapter's goes through here)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename) to disk where the file system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
