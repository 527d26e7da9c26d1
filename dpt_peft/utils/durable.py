"""The file-system steps under the write policy (`write_policy.py`): hashing, flushing files and folders to disk, the
modes a plain `open`/`mkdir` give under the umask, which paths are one file, the lock of a folder, and a full disk as
a one-line error. It imports only `utils/errors.py` of dpt_peft."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputRefused

try:
    import fcntl
except ImportError:  # Windows: `folder_lock` takes a lock file
    fcntl = None

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class WriteFailedError(OutputRefused, OSError):
    """A write that failed on a full disk: nothing half-written was kept; the message says how to go on (an `OSError`
    too, with the cause's `errno`)."""


def write_failure(err: BaseException, path: Path, fix: str) -> WriteFailedError | None:
    """The one-line error for a write of `path` that failed with `err` on a full disk (or quota); None for any other
    error (re-raise it). safetensors reports a full disk as its own error, "os error 28"."""
    code = err.errno if isinstance(err, OSError) else (errno.ENOSPC if "os error 28" in str(err) else None)
    if code not in DISK_FULL:
        return None
    failure = WriteFailedError(
        f"Could not write {path}: no space left on that disk ({err}). Nothing half-written was kept; {fix}"
    )
    failure.errno = code
    return failure


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def plain_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file under this process's umask (0644 under the usual 022)."""
    return 0o666 & ~_umask()


def plain_folder_mode() -> int:
    """The mode `mkdir` gives a new folder under this process's umask (0755 under 022; `mkdtemp` makes 0700)."""
    return 0o777 & ~_umask()


def flush_tree(folder: Path) -> list[str]:
    """Give `folder`, its files and subfolders the modes a plain write gives and flush them to disk; the files'
    paths relative to `folder`."""
    names = []
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_symlink():
            continue
        if path.is_file():
            os.chmod(path, plain_file_mode())
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            names.append(path.relative_to(folder).as_posix())
        elif path.is_dir():
            os.chmod(path, plain_folder_mode())
            fsync_dir(path)
    os.chmod(folder, plain_folder_mode())
    fsync_dir(folder)
    return sorted(names)


def remove_empty_folders(start: Path, keep: bool = False) -> None:
    """Remove the folders under `start` (and `start` itself unless `keep`) that hold nothing."""
    for path in sorted(start.rglob("*"), reverse=True):
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()
    if not keep and start.is_dir() and not any(start.iterdir()):
        start.rmdir()


def file_identity(path: Path) -> tuple[int, int] | None:
    """What makes two paths one regular file (device, inode), through links; None when there is none."""
    try:
        found = path.stat()
    except OSError:
        return None
    return (found.st_dev, found.st_ino) if stat.S_ISREG(found.st_mode) else None


@contextlib.contextmanager
def folder_lock(folder: Path, fallback_file: str) -> Iterator[None]:
    """Hold an OS-level lock of `folder` (`flock` of the folder itself: no file is left behind), released by the
    kernel when its process dies. Where a folder cannot be locked (Windows, some network file systems), `filelock`
    on `folder / fallback_file`."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            if fcntl is None:
                raise OSError(errno.ENOTSUP, "a folder cannot be locked here")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            from filelock import FileLock

            with FileLock(folder / fallback_file):
                yield
            return
        yield
    finally:
        os.close(fd)  # releases the flock
