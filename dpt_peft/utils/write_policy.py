"""The one write policy of every command (docs/reliability.md, "The crash model"): a file is created new, or
replaced only when dpt_peft wrote it, as recorded with its sha256 in the manifest of the folder it was written to;
everything is written atomically (temporary file, fsync, `os.replace`); `--overwrite_output_dir` removes only recorded
files. A kill at any point leaves only files the manifest knows as dpt_peft's: temporaries are ours by their name,
and a write of several files records its intent first. The manifest is changed under a lock, so two writers into one
folder never lose an entry. It imports only `utils/errors.py` and `utils/durable.py` of dpt_peft, so every layer may
use it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .durable import (
    file_identity,
    flush_tree,
    folder_lock,
    fsync_dir,
    plain_file_mode,
    remove_empty_folders,
    sha256_of,
    write_failure,
)
from .errors import OutputRefused, UserInputError

MANIFEST_FILE = ".dpt_peft_written.json"
MANIFEST_FORMAT = "dpt_peft-written-files"
WHOLE_DIR = "*"  # a manifest value: everything under this folder is dpt_peft's (a half-written checkpoint, logs)
# A manifest value recorded before a write (the intent): the file at this path is dpt_peft's whatever its content
# (renamed into place by a command killed before it recorded the hash) until its sha256 replaces this.
PENDING = "pending"
# Every temporary file or folder dpt_peft makes starts with this: ours by its name, so a kill that leaves one never
# blocks a resume or --overwrite_output_dir (the checks ignore it, --overwrite_output_dir removes it).
TEMPORARY_PREFIX = ".dpt_peft-tmp."


def is_temporary(relative: str | os.PathLike) -> bool:
    """Whether a path (relative to an output folder) is, or is inside, a temporary of dpt_peft's (by its name)."""
    return any(part.startswith(TEMPORARY_PREFIX) for part in Path(relative).parts)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], durable: bool = True) -> None:
    """`write(temporary)` then rename over `path`: a reader sees the old file or the new, never half. `durable`
    also flushes the file and the rename to disk (what a run keeps); a cache, rebuilt when lost, skips that cost."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{TEMPORARY_PREFIX}{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        write(temporary)
        os.chmod(temporary, plain_file_mode())  # mkstemp makes 0600; a team sharing a run folder must read it
        if durable:
            with open(temporary, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as err:
        temporary.unlink(missing_ok=True)
        failure = write_failure(err, path, f"{path} is as it was; free space and run the command again.")
        if failure is None:
            raise
        raise failure from err
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
        fd, probe = tempfile.mkstemp(prefix=f"{TEMPORARY_PREFIX}probe.", dir=existing)
    except OSError as err:
        raise OutputRefused(
            f"{flag} {directory} cannot be written ({existing}: {err.strerror or err}); choose a writable {flag}."
        ) from err
    os.close(fd)
    os.unlink(probe)


def read_json(path: str | os.PathLike, what: str, fix: str, mapping: bool = False, max_bytes: int | None = None) -> Any:
    """An input file of JSON (or YAML, by its suffix, without aliases: a few hundred bytes of them expand to gigabytes);
    a missing, unreadable, truncated or malformed one, one over `max_bytes` (or, with `mapping`, one not holding a
    mapping) is a `UserInputError` naming the file, what it is and `fix`."""
    path = Path(path)
    malformed: tuple[type[Exception], ...] = (OSError, ValueError)  # UnicodeDecodeError, JSONDecodeError
    try:
        if max_bytes is not None and path.is_file() and path.stat().st_size > max_bytes:
            raise UserInputError(f"it is over {max_bytes} bytes, more than such a file holds")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml  # only for YAML settings files

            malformed += (yaml.YAMLError,)
            content = yaml.load(text, Loader=_yaml_loader_without_aliases())  # noqa: S506 (a SafeLoader)
        else:
            content = json.loads(text)
    except UserInputError as err:  # too big, or a YAML alias
        raise UserInputError(f"{path} ({what}) is refused: {err}; {fix}") from err
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


def _yaml_loader_without_aliases() -> type:
    """yaml's SafeLoader refusing every alias (`*name`): values are written out, never expanded from anchors."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                line = self.peek_event().start_mark.line + 1
                raise UserInputError(f"line {line} has a YAML alias (*name), which is not accepted: write values out")
            return super().compose_node(parent, index)

    return Loader


class OutputFolder:
    """A folder dpt_peft writes into, with its manifest (`MANIFEST_FILE`: relative path -> sha256, `WHOLE_DIR` or
    `PENDING`), changed only under the folder's lock (`durable.folder_lock`)."""

    def __init__(self, root: str | os.PathLike, flag: str = "--output_dir"):
        self.root, self.flag = Path(root), flag

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_FILE

    def manifest(self) -> dict[str, str]:
        return _read_manifest(self.manifest_path) or {}

    def manifest_problem(self) -> str | None:
        """Why this folder's manifest records nothing, for a refusal (None when it is there and readable)."""
        path = self.manifest_path
        if not path.exists():
            return (
                f"{path} (the manifest of what dpt_peft wrote) is missing: it was removed, or the folder was copied "
                "without its hidden files (`cp -r run/*`; copy the folder itself: `cp -r run copy`)"
            )
        if _read_manifest(path) is None:
            return f"{path} (the manifest of what dpt_peft wrote) is truncated or corrupt"
        return None

    def owns(self, relative: str) -> bool:
        """Whether a manifest here records `relative` unchanged (or `PENDING`), or it is one of our temporaries."""
        return _owned(self.root, Path(relative))

    def recorded(self, relative: str) -> bool:
        """Whether this folder's manifest lists `relative`, whatever its content now (ours, damaged since: redo it)."""
        return Path(relative).as_posix() in self.manifest()

    def check(
        self,
        names: Iterable[str],
        overwrite_flag: str | None = None,
        overwrite: bool = False,
        inputs: Iterable[str | os.PathLike] = (),
    ) -> None:
        """Before any work: the folder is writable, no `names` is one of the command's `inputs` (whatever the flags),
        and none exists that dpt_peft did not write (unless `overwrite`, given by `overwrite_flag`)."""
        check_writable_dir(self.root, self.flag)
        protected = {file_identity(Path(p)) for p in inputs} - {None}
        for name in names:
            path = self.root / name
            if file_identity(path) in protected:
                raise OutputRefused(
                    f"{path} is one of this command's inputs, and an input is never written over, whatever the "
                    f"flags: choose another {self.flag}."
                )
            if path.is_symlink() or (path.exists() and not path.is_file()):
                raise OutputRefused(
                    f"{path} exists and is not a file dpt_peft wrote; move it, or choose another {self.flag}."
                )
            if path.exists() and not overwrite and not self.owns(name):
                allow = f", or pass {overwrite_flag} to replace it" if overwrite_flag else ""
                why = self.manifest_problem()
                raise OutputRefused(
                    f"{path} exists and dpt_peft did not write it (it is not in {self.manifest_path.name} with this "
                    f"content{f'; {why}' if why else ''}), so it is never replaced: move it, choose another "
                    f"{self.flag}{allow}."
                )

    def write(self, relative: str, write: Callable[[Path], None]) -> Path:
        """Write `relative` atomically with `write(temporary_path)` and record it; its intent (`PENDING`) is recorded
        first, so a kill between the rename and the record leaves a file the checks know as dpt_peft's."""
        path, key = self.root / relative, Path(relative).as_posix()
        previous = self.manifest().get(key)
        self._update(lambda entries: {**entries, key: PENDING})
        try:
            atomic_write(path, write)
        except Exception:  # the file is as it was: so is its entry
            self._update(lambda entries: {**_without(entries, key), **({key: previous} if previous else {})})
            raise
        self.record([relative])
        return path

    def write_bytes(self, relative: str, data: bytes) -> Path:
        return self.write(relative, lambda temporary: temporary.write_bytes(data))

    def write_text(self, relative: str, text: str) -> Path:
        return self.write_bytes(relative, text.encode("utf-8"))

    def write_json(self, relative: str, value: Any) -> Path:
        return self.write_text(relative, json.dumps(value, indent=2))

    def write_folder(self, relative: str, write: Callable[[Path], None], fix: str) -> Path:
        """A folder of files a library writes in one call (`save_pretrained`), replaced whole: `write(temporary)` into
        a temporary folder beside it (ours by its name), every file flushed; then the intent recorded (every file of
        the old and the new folder is `PENDING`), the old files removed, the new folder renamed into place and each
        file recorded with its sha256. A kill at any point leaves only files the checks know as dpt_peft's; a failed
        write (a full disk: a `WriteFailedError` ending with `fix`) leaves the old folder as it was."""
        target = self.root / relative
        foreign = self.unowned(relative) if target.is_dir() else []
        if target.is_symlink() or target.is_file() or foreign:
            raise OutputRefused(
                f"{target} holds {foreign[0] if foreign else 'a file'!r}, which dpt_peft did not write, so it is "
                f"never replaced: move it, or choose another {self.flag}."
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}{target.name}.", dir=target.parent))
        try:
            write(temporary)
            new = flush_tree(temporary)
        except BaseException as err:
            shutil.rmtree(temporary, ignore_errors=True)
            failure = write_failure(err, target, fix)
            if failure is None:
                raise
            raise failure from err
        prefix = Path(relative).as_posix()
        old = [p.relative_to(self.root).as_posix() for p in target.rglob("*") if p.is_file()] if target.is_dir() else []
        self._update(lambda entries: {**entries, **dict.fromkeys([*old, *(f"{prefix}/{n}" for n in new)], PENDING)})
        if target.is_dir():
            for name in old:
                (self.root / name).unlink()
            remove_empty_folders(target)
        os.replace(temporary, target)
        fsync_dir(target.parent)
        hashes = {f"{prefix}/{name}": sha256_of(target / name) for name in new}
        self._update(lambda entries: {**_without(entries, prefix), **hashes})
        return target

    def record(self, relatives: Iterable[str]) -> None:
        """Record files (written here, or by a library such as `save_pretrained`) as dpt_peft's, with their hash."""
        hashes = {}
        for relative in relatives:
            path = self.root / relative
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            hashes.update({file.relative_to(self.root).as_posix(): sha256_of(file) for file in files})
        self._update(lambda entries: {**entries, **hashes})

    def record_hashes(self, hashes: dict[str, str], replacing: str) -> None:
        """Record files by sha256 computed already (a checkpoint's own manifest) in place of every entry under
        `replacing`, also before they are renamed to those paths (an entry for a path that holds no file owns
        nothing), so that they are the run's from the moment they appear."""
        self._update(lambda entries: {**_without(entries, Path(replacing).as_posix()), **hashes})

    def record_dir(self, relative: str) -> None:
        """Record a folder whose whole content is dpt_peft's (a checkpoint being written, tracker logs)."""
        self._update(lambda entries: {**entries, Path(relative).as_posix(): WHOLE_DIR})

    def forget(self, relative: str) -> None:
        """Drop `relative` and everything under it from the manifest (it was moved or removed)."""
        self._update(lambda entries: _without(entries, Path(relative).as_posix()))

    def unowned(self, under: str = ".") -> list[str]:
        """Every entry under the folder (or its subfolder `under`) that no manifest records unchanged and that is no
        temporary of dpt_peft's (symbolic links always)."""
        start = self.root / under
        if not start.is_dir():
            return []
        found = []
        for path in sorted(start.rglob("*")):
            relative = path.relative_to(self.root)
            recorded = path.is_dir() or path.name == MANIFEST_FILE or _owned(self.root, relative)
            if path.is_symlink() or not recorded:
                found.append(relative.as_posix())
        return found

    def remove_owned(self, under: str = ".", damaged: bool = False) -> list[str]:
        """Delete every file a manifest records unchanged (and dpt_peft's temporaries, the manifests, then folders
        left empty) in the folder, or only in its subfolder `under` (then forgotten); what --overwrite_output_dir
        does. `damaged`: also the files this folder's manifest lists whose content changed since (a checkpoint of
        ours, truncated or corrupt). Returns the removed paths."""
        start = self.root / under
        if not start.is_dir():
            if under != ".":
                self.forget(under)
            return []
        listed = self.manifest() if damaged else {}
        removed = []
        for path in sorted(start.rglob("*"), reverse=True):
            relative = path.relative_to(self.root)
            if not path.is_file() or path.is_symlink() or path.name == MANIFEST_FILE:
                continue
            if relative.as_posix() in listed or _owned(self.root, relative):
                path.unlink()
                removed.append(relative.as_posix())
        if under == ".":
            for manifest in sorted(self.root.rglob(MANIFEST_FILE), reverse=True):
                manifest.unlink()
        else:
            self.forget(under)
        remove_empty_folders(start, keep=start == self.root)
        return removed

    def remove_temporaries(self) -> None:
        """Delete the temporaries a killed command left here (ours by their name); only while no command writes."""
        for path in sorted(self.root.rglob(f"{TEMPORARY_PREFIX}*"), reverse=True):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()

    def _update(self, change: Callable[[dict[str, str]], dict[str, str]]) -> None:
        """Read, `change` and write the manifest under the folder's lock: concurrent writers never lose an entry."""
        with folder_lock(self.root, f"{TEMPORARY_PREFIX}manifest.lock"):
            entries = self.manifest()
            changed = change(dict(entries))
            if changed != entries:
                content = {"format": MANIFEST_FORMAT, "files": dict(sorted(changed.items()))}
                atomic_write_bytes(self.manifest_path, json.dumps(content, indent=1).encode())


def checked_file(
    path: str | os.PathLike,
    flag: str,
    overwrite_flag: str | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> tuple[OutputFolder, str]:
    """One output file given by a flag (`predict --output`, a report path): its folder, checked before any work
    (`OutputFolder.check`, never one of `inputs`), and its name there, for `folder.write...(name, ...)` once the work
    is done."""
    path = Path(path)
    folder = OutputFolder(path.parent, flag)
    folder.check([path.name], overwrite_flag, overwrite, inputs)
    return folder, path.name


def _without(entries: dict[str, str], prefix: str) -> dict[str, str]:
    return {k: v for k, v in entries.items() if k != prefix and not k.startswith(prefix + "/")}


def _read_manifest(path: Path) -> dict[str, str] | None:
    """A manifest's entries; None when it is missing or damaged (then it owns nothing, so nothing is replaced)."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    files = content.get("files") if isinstance(content, dict) and content.get("format") == MANIFEST_FORMAT else None
    if not isinstance(files, dict):
        return None
    return {k: v for k, v in files.items() if isinstance(k, str) and isinstance(v, str)}


def _owned(root: Path, relative: Path) -> bool:
    """Whether `relative` is a regular file that is one of dpt_peft's temporaries, or that the manifest of `root` or
    of a folder between it and the file records unchanged (or `PENDING`, or inside a `WHOLE_DIR`)."""
    path = root / relative
    if path.is_symlink() or not path.is_file():
        return False
    if is_temporary(relative):
        return True
    for depth in range(len(relative.parts)):
        folder = root.joinpath(*relative.parts[:depth])
        entries = _read_manifest(folder / MANIFEST_FILE) or {}
        inner = relative.parts[depth:]
        for cut in range(1, len(inner)):
            if entries.get("/".join(inner[:cut])) == WHOLE_DIR:
                return True
        recorded = entries.get("/".join(inner))
        if recorded == PENDING or (recorded not in (None, WHOLE_DIR) and recorded == sha256_of(path)):
            return True
    return False
