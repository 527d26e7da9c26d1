"""Reading a checkpoint safely: its manifest, the sha256 of every file it lists (checked again as each is read), and
which checkpoint to resume from. Nothing is unpickled (docs/reliability.md)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from ..utils.durable import sha256_of
from ..utils.errors import UserInputError
from .run_dir import first_difference
from .run_layout import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CHECKPOINTS,
    LEGACY_CHECKPOINT_FILE,
    MANIFEST,
    REQUIRED_CHECKPOINT_FILES,
    STATE_FILE,
    STATE_KEYS,
    checkpoint_dirs,
)

logger = logging.getLogger(__name__)


class CheckpointError(UserInputError):
    """A checkpoint that cannot be trusted or read: the message names the file and what to do."""


@dataclasses.dataclass
class VerifiedCheckpoint:
    """A checkpoint whose manifest was read and every file of it hash-checked; files are read through `read`,
    which checks the hash again (nothing but what the manifest lists is ever read, and nothing is unpickled)."""

    path: Path
    files: dict[str, dict]
    state: dict

    def read(self, name: str) -> bytes:
        data = (self.path / name).read_bytes() if name in self.files else None
        if data is None or hashlib.sha256(data).hexdigest() != self.files[name]["sha256"]:
            raise CheckpointError(
                f"{self.path / name} changed since its checkpoint was verified (sha256 mismatch); resume again."
            )
        return data

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(
                f"{self.path / name} is not valid JSON ({err}); resume from another checkpoint."
            ) from err

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        try:
            return load_safetensors(self.read(name))
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"{self.path / name} is not a readable safetensors file ({err}).") from err


def _legacy(path: Path) -> bool:
    return any(LEGACY_CHECKPOINT_FILE.fullmatch(p.name) for p in path.iterdir() if p.suffix in (".pkl", ".bin"))


def verify_checkpoint(path: Path) -> VerifiedCheckpoint:
    """Read `path`'s manifest and check the sha256 of every file it lists; errors name the file."""
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint {path} does not exist or is not a directory.")
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        if _legacy(path):
            raise CheckpointError(
                f"Checkpoint {path} has the pickle-based format of dpt_peft before 0.3 (Accelerate's save_state), "
                "which is no longer loaded because unpickling a file can run arbitrary code. Train again (pass "
                "--overwrite_output_dir to replace that run)."
            )
        raise CheckpointError(f"Checkpoint {path} has no {MANIFEST}: it is incomplete or not a dpt_peft checkpoint.")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != CHECKPOINT_FORMAT or not isinstance(files, dict):
            raise UserInputError(f"format {manifest.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        if manifest.get("version") != CHECKPOINT_VERSION:
            raise UserInputError(f"version {manifest.get('version')!r}, this dpt_peft reads {CHECKPOINT_VERSION}")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"{manifest_path} cannot be read ({type(err).__name__}: {err}); the manifest is truncated or corrupt, "
            f"so checkpoint {path} cannot be verified: resume from another checkpoint."
        ) from err
    missing = [name for name in REQUIRED_CHECKPOINT_FILES if name not in files]
    if missing:
        raise CheckpointError(f"{manifest_path} lists no {missing[0]}; checkpoint {path} is incomplete.")
    for name, entry in files.items():
        file = path / name
        inside = not Path(name).is_absolute() and ".." not in Path(name).parts and name != MANIFEST
        if not inside or not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise CheckpointError(f"{manifest_path} has an invalid entry {name!r}; checkpoint {path} is corrupt.")
        if not file.is_file():
            raise CheckpointError(f"{file} is missing; checkpoint {path} is incomplete.")
        if sha256_of(file) != entry["sha256"]:
            raise CheckpointError(
                f"{file} does not match its sha256 in {manifest_path}: the file is truncated, corrupt or was "
                f"modified, so checkpoint {path} cannot be trusted."
            )
    listed = {path / name for name in files} | {manifest_path}
    extra = [p for p in path.rglob("*") if p.is_file() and p not in listed]
    if extra:
        logger.warning("Ignoring %d file(s) in %s that its manifest does not list: %s", len(extra), path, extra[:5])
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        lacking = [key for key in STATE_KEYS if key not in state]
        if lacking:
            raise KeyError(lacking[0])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{path / STATE_FILE} is not a valid trainer state ({type(err).__name__}: {err})."
        ) from err
    _check_state_types(state, path / STATE_FILE)
    return VerifiedCheckpoint(path, files, state)


def _is(kind: type, value: Any) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


# What each trainer-state value must be (RunState.to_dict), as a test and the words for a refusal.
_STATE_TYPES = {
    "epoch": (lambda v: _is(int, v) and v >= 0, "an epoch number (0 or more)"),
    "global_step": (lambda v: _is(int, v) and v >= 0, "a step count (0 or more)"),
    "history": (lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "a list of epoch records"),
    "train_seconds": (lambda v: _is(int, v) or _is(float, v), "a number of seconds"),
    "run": (lambda v: isinstance(v, dict), "the run's arguments (a mapping)"),
    "train_images": (lambda v: _is(int, v), "an image count"),
    "best_val_accuracy": (lambda v: v is None or _is(int, v) or _is(float, v), "an accuracy or null"),
    "best_epoch": (lambda v: v is None or _is(int, v), "an epoch number or null"),
    "accelerator_step": (lambda v: _is(int, v), "a step count"),
}


def _check_state_types(state: Any, path: Path) -> None:
    """Every value of a trainer state has its type, so restoring never fails on one (a raw TypeError)."""
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} holds a {type(state).__name__}, not a trainer state; resume from another checkpoint."
        )
    for key, (valid, what) in _STATE_TYPES.items():
        if key in state and not valid(state[key]):
            raise CheckpointError(
                f"{path}: {key!r} is {state[key]!r}, not {what}; the checkpoint is damaged: resume from another "
                "checkpoint (--resume_from_checkpoint latest skips a damaged newest one)."
            )


def resolve_checkpoint(resume_from_checkpoint: str, output_dir: str | os.PathLike) -> VerifiedCheckpoint:
    """The verified checkpoint to resume from: a path, or 'latest' in `output_dir`. With 'latest', a corrupt newest
    checkpoint is skipped with a warning for the newest intact one; a checkpoint given by path must be intact."""
    if resume_from_checkpoint != "latest":
        try:
            return verify_checkpoint(Path(resume_from_checkpoint))
        except CheckpointError as err:
            raise CheckpointError(f"--resume_from_checkpoint {resume_from_checkpoint}: {err}") from err
    root = Path(output_dir) / CHECKPOINTS
    found = checkpoint_dirs(Path(output_dir))
    if not found:
        raise UserInputError(f"--resume_from_checkpoint latest: no checkpoint in {root}.")
    failures: list[tuple[Path, CheckpointError]] = []
    for path in reversed(found):
        try:
            checkpoint = verify_checkpoint(path)
        except CheckpointError as err:
            failures.append((path, err))
            continue
        if failures:
            logger.warning(
                "--resume_from_checkpoint latest: skipping the corrupt checkpoint(s) %s (%s); resuming from %s, "
                "the newest intact one.",
                ", ".join(str(p) for p, _ in failures),
                failures[0][1],
                path,
            )
        return checkpoint
    details = "; ".join(f"{p.name}: {e}" for p, e in failures)
    raise CheckpointError(
        f"--resume_from_checkpoint latest: no intact checkpoint in {root} ({details}). Train again with "
        "--overwrite_output_dir."
    )


def checkpoint_to_resume(
    resume_from_checkpoint: str, output_dir: str | os.PathLike, identity: dict
) -> VerifiedCheckpoint:
    """The verified checkpoint to resume from (its trainer state in `.state`), refused when it belongs to another
    run."""
    checkpoint = resolve_checkpoint(resume_from_checkpoint, output_dir)
    difference = first_difference(checkpoint.state["run"], identity)
    if difference is not None:
        raise UserInputError(
            f"Checkpoint {checkpoint.path} was made with another config ({difference}); "
            "resume with the same arguments, or start a new run in another --output_dir."
        )
    return checkpoint
