"""The one write policy of every command (docs/reliability.md): a file is created new, or replaced only when
dpt_peft wrote it, as recorded with its sha256 in the manifest of the folder it was written to; everything is
written atomically (temporary file, fsync, `os.replace`); `--overwrite_output_dir` removes only recorded files.
It imports only `utils/errors.py` of dpt_peft, so every layer may use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import OutputRefused, UserInputError

MANIFEST_FILE = ".dpt_peft_written.json"
MANIFEST_FORMAT = "dpt_peft-written-files"
WHOLE_DIR = "*"  # a manifest value: everything under this folder is dpt_peft's (a half-written checkpoint, logs)


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


def plain_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file under this process's umask (0644 under the usual 022)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], durable: bool = True) -> None:
    """`write(temporary)` then rename over `path`: a reader sees the old file or the new, never half. `durable`
    also flushes the file and the rename to disk (what a run keeps); a cache, rebuilt when lost, skips that cost."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        write(temporary)
        os.chmod(temporary, plain_file_mode())  # mkstemp makes 0600; a team sharing a run folder must read it
        if durable:
            with open(temporary, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    atomic_write(path, lambda temporary: temporary.write_bytes(data), durable)


def check_writable_dir(directory: str | os.PathLike, flag: str) -> None:
    """Before any work: `directory` is (or can be made) a folder this process can create files in."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputRefused(f"{flag} {directory} is a file, not a folder; choose another {flag}.")
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputRefused(f"{flag} {directory}: {existing} is a file, so the folder cannot be made; choose another.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dpt_peft_probe.", dir=existing)
    except OSError as err:
        raise OutputRefused(
            f"{flag} {directory} cannot be written ({existing}: {err.strerror or err}); choose a writable {flag}."
        ) from err
    os.close(fd)
    os.unlink(probe)


def read_json(path: str | os.PathLike, what: str, fix: str, mapping: bool = False) -> Any:
    """An input file of JSON (or YAML, by its suffix); a missing, unreadable, truncated or malformed one (or, with
    `mapping`, one not holding a mapping) is a `UserInputError` naming the file, what it is and `fix`."""
    path = Path(path)
    malformed: tuple[type[Exception], ...] = (OSError, ValueError)  # UnicodeDecodeError, JSONDecodeError
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml  # only for YAML settings files

            malformed += (yaml.YAMLError,)
            content = yaml.safe_load(text)
        else:
            content = json.loads(text)
    except FileNotFoundError as err:
        raise UserInputError(f"{path} ({what}) does not exist; {fix}") from err
    except IsADirectoryError as err:
        raise UserInputError(f"{path} ({what}) is a folder, not a file; {fix}") from err
    except malformed as err:
        detail = " ".join(str(err).split())
        raise UserInputError(
            f"{path} ({what}) cannot be read: {detail}. The file is truncated or corrupt; {fix}"
        ) from err
    if mapping and not isinstance(content, dict):
        raise UserInputError(
            f"{path} ({what}) holds a {type(content).__name__}, not a mapping of names to values; {fix}"
        )
    return content


class OutputFolder:
    """A folder dpt_peft writes into, with its manifest (`MANIFEST_FILE`: relative path -> sha256)."""

    def __init__(self, root: str | os.PathLike, flag: str = "--output_dir"):
        self.root, self.flag = Path(root), flag

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_FILE

    def manifest(self) -> dict[str, str]:
        return _read_manifest(self.manifest_path)

    def owns(self, relative: str) -> bool:
        """True when `relative` is recorded in this folder's (or a nested folder's) manifest, unchanged since."""
        return _owned(self.root, Path(relative))

    def recorded(self, relative: str) -> bool:
        """True when this folder's manifest lists `relative`, whatever its content now (a file of ours damaged since,
        e.g. by a full disk, that may be redone)."""
        return Path(relative).as_posix() in self.manifest()

    def check(self, names: Iterable[str], overwrite_flag: str | None = None, overwrite: bool = False) -> None:
        """Before any work: the folder is writable and no `names` exists that dpt_peft did not write (unless
        `overwrite`, given by `overwrite_flag`)."""
        check_writable_dir(self.root, self.flag)
        for name in names:
            path = self.root / name
            if path.is_symlink() or (path.exists() and not path.is_file()):
                raise OutputRefused(
                    f"{path} exists and is not a file dpt_peft wrote; move it, or choose another {self.flag}."
                )
            if path.exists() and not overwrite and not self.owns(name):
                allow = f", or pass {overwrite_flag} to replace it" if overwrite_flag else ""
                raise OutputRefused(
                    f"{path} exists and dpt_peft did not write it (it is not in {self.manifest_path.name} with this "
                    f"content), so it is never replaced: move it, choose another {self.flag}{allow}."
                )

    def write(self, relative: str, write: Callable[[Path], None]) -> Path:
        """Write `relative` atomically with `write(temporary_path)` and record it."""
        path = self.root / relative
        atomic_write(path, write)
        self.record([relative])
        return path

    def write_bytes(self, relative: str, data: bytes) -> Path:
        return self.write(relative, lambda temporary: temporary.write_bytes(data))

    def write_text(self, relative: str, text: str) -> Path:
        return self.write_bytes(relative, text.encode("utf-8"))

    def write_json(self, relative: str, value: Any) -> Path:
        return self.write_text(relative, json.dumps(value, indent=2))

    def record(self, relatives: Iterable[str]) -> None:
        """Record files (written here, or by a library such as `save_pretrained`) as dpt_peft's, with their hash."""
        entries = self.manifest()
        for relative in relatives:
            path = self.root / relative
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for file in files:
                entries[file.relative_to(self.root).as_posix()] = sha256_of(file)
        self._save(entries)

    def record_dir(self, relative: str) -> None:
        """Record a folder whose whole content is dpt_peft's (a checkpoint being written, tracker logs)."""
        self._save({**self.manifest(), Path(relative).as_posix(): WHOLE_DIR})

    def forget(self, relative: str) -> None:
        """Drop `relative` and everything under it from the manifest (it was moved or removed)."""
        prefix = Path(relative).as_posix()
        entries = self.manifest()
        kept = {k: v for k, v in entries.items() if k != prefix and not k.startswith(prefix + "/")}
        if kept != entries:
            self._save(kept)

    def unowned(self) -> list[str]:
        """Every entry under the folder that no manifest records unchanged (symbolic links always)."""
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.rglob("*")):
            relative = path.relative_to(self.root)
            recorded = path.is_dir() or path.name == MANIFEST_FILE or _owned(self.root, relative)
            if path.is_symlink() or not recorded:
                found.append(relative.as_posix())
        return found

    def remove_owned(self) -> list[str]:
        """Delete every file a manifest records unchanged (and the manifests, then folders left empty); what
        --overwrite_output_dir does. Returns the removed paths."""
        removed = []
        for path in sorted(self.root.rglob("*"), reverse=True):
            relative = path.relative_to(self.root)
            if path.is_file() and not path.is_symlink() and path.name != MANIFEST_FILE and _owned(self.root, relative):
                path.unlink()
                removed.append(relative.as_posix())
        for manifest in sorted(self.root.rglob(MANIFEST_FILE), reverse=True):
            manifest.unlink()
        for path in sorted(self.root.rglob("*"), reverse=True):
            if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
                path.rmdir()
        return removed

    def _save(self, entries: dict[str, str]) -> None:
        content = {"format": MANIFEST_FORMAT, "files": dict(sorted(entries.items()))}
        atomic_write_bytes(self.manifest_path, json.dumps(content, indent=1).encode())


def checked_file(
    path: str | os.PathLike, flag: str, overwrite_flag: str | None = None, overwrite: bool = False
) -> tuple[OutputFolder, str]:
    """One output file given by a flag (`predict --output`, a report path): its folder, checked before any work
    (`OutputFolder.check`), and its name there, for `folder.write...(name, ...)` once the work is done."""
    path = Path(path)
    folder = OutputFolder(path.parent, flag)
    folder.check([path.name], overwrite_flag, overwrite)
    return folder, path.name


def _read_manifest(path: Path) -> dict[str, str]:
    """A manifest's entries; a missing one is empty, and a damaged one owns nothing (so nothing is replaced)."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    files = content.get("files") if isinstance(content, dict) and content.get("format") == MANIFEST_FORMAT else None
    if not isinstance(files, dict):
        return {}
    return {k: v for k, v in files.items() if isinstance(k, str) and isinstance(v, str)}


def _owned(root: Path, relative: Path) -> bool:
    """Whether the manifest of `root` or of a folder between it and `relative` records the file unchanged."""
    path = root / relative
    if path.is_symlink() or not path.is_file():
        return False
    for depth in range(len(relative.parts)):
        folder = root.joinpath(*relative.parts[:depth])
        entries = _read_manifest(folder / MANIFEST_FILE)
        inner = relative.parts[depth:]
        for cut in range(1, len(inner)):
            if entries.get("/".join(inner[:cut])) == WHOLE_DIR:
                return True
        recorded = entries.get("/".join(inner))
        if recorded is not None and recorded != WHOLE_DIR and recorded == sha256_of(path):
            return True
    return False
