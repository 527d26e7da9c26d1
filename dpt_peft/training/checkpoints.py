"""Per-epoch checkpoints of a run, and resuming from them.

A checkpoint is written to `epoch_N.partial` and renamed into place, so a killed run leaves only complete ones. It
holds no pickle: the adapter and optimizer tensors are safetensors, everything else JSON, and `manifest.json`
records the sha256 of every file, verified before anything is resumed from it (docs/reliability.md).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import random
import shutil
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft import set_peft_model_state_dict
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .arguments import TrainArguments
from .run_dir import (
    CHECKPOINT_DIR,
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CHECKPOINTS,
    LEGACY_CHECKPOINT_FILE,
    MANIFEST,
    REQUIRED_CHECKPOINT_FILES,
    RUN_FILE,
    STATE_FILE,
    STATE_KEYS,
    TEMPORARY_CHECKPOINT_DIR,
    CheckpointError,
    first_difference,
    fsync_dir,
    on_main_process,
    write_file,
)

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- saving


@dataclasses.dataclass
class Checkpointed:
    """What a checkpoint holds besides the trainer state (`register_checkpointed`)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator


_CHECKPOINTED: weakref.WeakKeyDictionary[Accelerator, Checkpointed] = weakref.WeakKeyDictionary()


def register_checkpointed(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
) -> None:
    """The model (its adapter), optimizer, scheduler and DataLoader generator that `save_checkpoint` writes."""
    _CHECKPOINTED[accelerator] = Checkpointed(model, optimizer, scheduler, generator)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _to_json(value: Any) -> bytes:
    return json.dumps(value, indent=1).encode()


def _optimizer_files(optimizer: torch.optim.Optimizer) -> tuple[bytes, bytes]:
    """optimizer.safetensors (every tensor of the state) and optimizer.json (the rest, tensors by key)."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict] = {}
    for index, values in state_dict["state"].items():
        state[str(index)] = {}
        for name, value in values.items():
            if torch.is_tensor(value):
                key = f"state.{index}.{name}"
                tensors[key] = value.detach().cpu().contiguous()
                state[str(index)][name] = {"tensor": key}
            else:
                state[str(index)][name] = {"value": value}
    return save_safetensors(tensors), _to_json({"state": state, "param_groups": state_dict["param_groups"]})


def _rng_state(generator: torch.Generator) -> tuple[dict, dict[str, torch.Tensor]]:
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    numbers = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    return numbers, tensors


def save_checkpoint(accelerator: Accelerator, args: TrainArguments, state: dict, identity: dict) -> None:
    """`checkpoints/epoch_N`, written by the main process into `epoch_N.partial` and renamed into place; then
    the oldest beyond --checkpoints_to_keep are removed. A failed write leaves the earlier checkpoints as they were.
    """
    objects = _CHECKPOINTED[accelerator]
    rng = _rng_state(objects.generator)
    rng_all = gather_object([rng]) if accelerator.num_processes > 1 else [rng]  # every process's generators
    output_dir = Path(args.output_dir)
    root = output_dir / CHECKPOINTS
    final = root / f"epoch_{state['epoch']}"
    partial, old = final.with_name(final.name + ".partial"), final.with_name(final.name + ".old")
    model = accelerator.unwrap_model(objects.model)

    def write() -> None:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.iterdir():  # of a run killed while writing
            if TEMPORARY_CHECKPOINT_DIR.fullmatch(leftover.name) and leftover.is_dir():
                shutil.rmtree(leftover)
        try:
            partial.mkdir()
            model.save_pretrained(str(partial / "adapter"))
            tensors, meta = _optimizer_files(objects.optimizer)
            write_file(partial / "optimizer.safetensors", tensors)
            write_file(partial / "optimizer.json", meta)
            write_file(partial / "scheduler.json", _to_json(objects.scheduler.state_dict()))
            rng_tensors = {
                f"process_{i}.{k}": t.cpu().contiguous() for i, (_, ts) in enumerate(rng_all) for k, t in ts.items()
            }
            write_file(partial / "rng.safetensors", save_safetensors(rng_tensors))
            write_file(partial / "rng.json", _to_json({"processes": [numbers for numbers, _ in rng_all]}))
            if accelerator.scaler is not None:
                write_file(partial / "scaler.json", _to_json(accelerator.scaler.state_dict()))
            trainer_state = {**state, "accelerator_step": accelerator.step, "run": identity}
            write_file(partial / STATE_FILE, _to_json(trainer_state))
            files = {
                str(p.relative_to(partial).as_posix()): {"sha256": _sha256(p), "size": p.stat().st_size}
                for p in sorted(partial.rglob("*"))
                if p.is_file()
            }
            manifest = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "files": files}
            write_file(partial / MANIFEST, _to_json(manifest))
            fsync_dir(partial)
            if final.exists():
                os.replace(final, old)
            os.replace(partial, final)
            fsync_dir(root)
        except Exception as err:
            shutil.rmtree(partial, ignore_errors=True)
            if old.exists() and not final.exists():
                os.replace(old, final)
            failure = _write_error(err, final, output_dir)
            if failure is None:
                raise
            raise failure from err
        shutil.rmtree(old, ignore_errors=True)
        for stale in checkpoint_dirs(output_dir)[: -args.checkpoints_to_keep]:
            shutil.rmtree(stale)

    on_main_process(accelerator, write)


def _write_error(err: Exception, final: Path, output_dir: Path) -> OSError | None:
    """The error to raise when writing checkpoint `final` failed with `err` (None: re-raise `err`)."""
    code = err.errno if isinstance(err, OSError) else None
    if code is None and "os error 28" in str(err):  # safetensors' (Rust) error for a full disk
        code = errno.ENOSPC
    if not isinstance(err, OSError) and code is None:
        return None
    intact = [p.name for p in checkpoint_dirs(output_dir)]
    kept = f"the earlier checkpoints ({', '.join(intact)}) are intact" if intact else "no checkpoint was written"
    if code in (errno.ENOSPC, errno.EDQUOT):
        message = (
            f"No space left to write checkpoint {final} in {final.parent}: {err}. Nothing of it was kept and {kept}; "
            "free space on that disk (or lower --checkpoints_to_keep) and continue with --resume_from_checkpoint "
            "latest."
        )
    else:
        message = (
            f"Could not write checkpoint {final} in {final.parent}: {err}. Nothing of it was kept and {kept}; fix the "
            "cause and continue with --resume_from_checkpoint latest."
        )
    return OSError(code, message) if code is not None else OSError(message)


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """The checkpoints of a run that were renamed into place (complete when written), oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_DIR.fullmatch(p.name).group(1)))


# ---------------------------------------------------------------------------------------------- resuming


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
            raise ValueError(f"format {manifest.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        if manifest.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"version {manifest.get('version')!r}, this dpt_peft reads {CHECKPOINT_VERSION}")
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
        if _sha256(file) != entry["sha256"]:
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
    return VerifiedCheckpoint(path, files, state)


def resolve_checkpoint(args: TrainArguments) -> VerifiedCheckpoint:
    """The verified checkpoint to resume from. With 'latest', a corrupt newest checkpoint is skipped with a
    warning for the newest intact one; a checkpoint given by path must be intact."""
    if args.resume_from_checkpoint != "latest":
        try:
            return verify_checkpoint(Path(args.resume_from_checkpoint))
        except CheckpointError as err:
            raise CheckpointError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: {err}") from err
    root = Path(args.output_dir) / CHECKPOINTS
    found = checkpoint_dirs(Path(args.output_dir))
    if not found:
        raise ValueError(f"--resume_from_checkpoint latest: no checkpoint in {root}.")
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


def load_checkpoint_state(args: TrainArguments, identity: dict) -> tuple[VerifiedCheckpoint, dict]:
    """The verified checkpoint to resume from and its trainer state, refused when it belongs to another run."""
    checkpoint = resolve_checkpoint(args)
    state = checkpoint.state
    if state["run"] != identity:
        raise ValueError(
            f"Checkpoint {checkpoint.path} was made with another config ({first_difference(state['run'], identity)}); "
            "resume with the same arguments, or start a new run in another --output_dir."
        )
    return checkpoint, state


def _restore_optimizer(checkpoint: VerifiedCheckpoint, optimizer: torch.optim.Optimizer) -> None:
    tensors = checkpoint.tensors("optimizer.safetensors")
    meta = checkpoint.json("optimizer.json")
    try:
        state = {
            int(index): {
                name: tensors[value["tensor"]] if "tensor" in value else value["value"]
                for name, value in values.items()
            }
            for index, values in meta["state"].items()
        }
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{checkpoint.path / 'optimizer.json'} does not fit this optimizer ({type(err).__name__}: {err}); "
            "resume with the arguments of the run that wrote it."
        ) from err


def _restore_scheduler(checkpoint: VerifiedCheckpoint, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    saved = checkpoint.json("scheduler.json")
    expected = scheduler.state_dict()
    if not isinstance(saved, dict) or set(saved) != set(expected) or any(saved.get("lr_lambdas") or []):
        raise CheckpointError(
            f"{checkpoint.path / 'scheduler.json'} does not hold a state of {type(scheduler).__name__} (keys "
            f"{sorted(saved) if isinstance(saved, dict) else type(saved).__name__}); resume from another checkpoint."
        )
    scheduler.load_state_dict(saved)


def _restore_rng(checkpoint: VerifiedCheckpoint, accelerator: Accelerator, generator: torch.Generator) -> None:
    processes = checkpoint.json("rng.json")["processes"]
    tensors = checkpoint.tensors("rng.safetensors")
    index = accelerator.process_index
    if index >= len(processes):
        logger.warning(
            "%s holds the random states of %d process(es); process %d continues with those of process 0.",
            checkpoint.path,
            len(processes),
            index,
        )
        index = 0
    numbers = processes[index]
    try:
        version, internal, gauss = numbers["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, position, has_gauss, cached = numbers["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
        torch.set_rng_state(tensors[f"process_{index}.torch"])
        generator.set_state(tensors[f"process_{index}.generator"])
        if torch.cuda.is_available():
            cuda = [tensors[f"process_{index}.cuda_{i}"] for i in range(numbers["cuda_devices"])]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
            else:
                logger.warning("%s holds CUDA random states of %d device(s); not restored.", checkpoint.path, len(cuda))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{checkpoint.path / 'rng.json'} / rng.safetensors hold no valid random states ({type(err).__name__}: "
            f"{err}); resume from another checkpoint."
        ) from err


def load_checkpoint(accelerator: Accelerator, checkpoint: VerifiedCheckpoint) -> None:
    """Restore adapter, optimizer, scheduler, RNG (and fp16 scaler) states on every process, from files whose
    sha256 is checked again as they are read."""
    objects = _CHECKPOINTED[accelerator]
    weights = checkpoint.tensors("adapter/adapter_model.safetensors")
    model = accelerator.unwrap_model(objects.model)
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in getattr(result, "missing_keys", []) if ".dpt_" in k]
    if missing:
        raise CheckpointError(
            f"{checkpoint.path / 'adapter'} does not fill this model's prompts (missing {missing[:3]}); resume with "
            "the arguments of the run that wrote it."
        )
    _restore_optimizer(checkpoint, objects.optimizer)
    _restore_scheduler(checkpoint, objects.scheduler)
    _restore_rng(checkpoint, accelerator, objects.generator)
    if accelerator.scaler is not None and "scaler.json" in checkpoint.files:
        accelerator.scaler.load_state_dict(checkpoint.json("scaler.json"))
    accelerator.step = int(checkpoint.state.get("accelerator_step", 0))


def continue_flags(output_dir: str | os.PathLike) -> list[str]:
    """How to run an unfinished run again: from its latest checkpoint, or (killed before its first one) afresh,
    replacing only the run's own files; nothing when the directory holds no run."""
    if checkpoint_dirs(Path(output_dir)):
        return ["--resume_from_checkpoint", "latest"]
    return ["--overwrite_output_dir"] if (Path(output_dir) / RUN_FILE).exists() else []
