"""The lock of a run directory: one run at a time per directory. An OS-level lock (`filelock`: `flock` on POSIX)
on `LOCK_FILE`, which the kernel releases when its process dies, so there is no stale lock to take over (and no
race between two takers). The file stays; it holds the holder's pid, host and start time for the refusal."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from ..utils.write_policy import UserInputError
from .run_layout import LOCK_FILE


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return f"process {holder['pid']} on {holder.get('hostname')!r}, started {holder.get('started')}"
    except (OSError, ValueError, TypeError, KeyError):
        return "another process"


def _busy(path: Path) -> UserInputError:
    return UserInputError(
        f"Another dpt_peft run is using --output_dir {path.parent}: {path} is locked by {_holder(path)}. Wait for it "
        "to finish or choose another --output_dir (the lock goes away with its process)."
    )


def check_lock(path: Path) -> None:
    """Refuse when a live process holds the lock of `path`'s directory (reads only; creates nothing new)."""
    if not path.exists():
        return
    probe = FileLock(path)
    try:
        probe.acquire(timeout=0)
    except Timeout:
        raise _busy(path) from None
    probe.release()


@dataclasses.dataclass
class RunLock:
    """The lock of an output dir, held by this process (the main one) until `release` or its death."""

    path: Path
    lock: FileLock

    @classmethod
    def acquire(cls, output_dir: Path) -> RunLock:
        path = output_dir / LOCK_FILE
        lock = FileLock(path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise _busy(path) from None
        holder = {"pid": os.getpid(), "hostname": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        path.write_text(json.dumps(holder), encoding="utf-8")  # same inode: the lock is kept
        return cls(path, lock)

    def release(self) -> None:
        if self.lock.is_locked:
            self.path.write_text("", encoding="utf-8")
            self.lock.release()
