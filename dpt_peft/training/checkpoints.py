"""Per-epoch checkpoints of a run: `Checkpointer` writes the adapter, optimizer, scheduler and random states it was
made with, and restores them from a verified checkpoint (`checkpoint_files`).

A checkpoint is written to `epoch_N.partial` and renamed into place, so a killed run leaves only complete ones. It
holds no pickle: the adapter and optimizer tensors are safetensors, everything else JSON, and `manifest.json`
records the sha256 of every file (docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft import set_peft_model_state_dict
from safetensors.torch import save as save_safetensors

from ..utils.durable import flush_tree, fsync_dir, sha256_of, write_failure
from .checkpoint_files import CheckpointError, VerifiedCheckpoint
from .prompt_averaging import PromptAverage
from .run_dir import RunDir, on_main_process, write_file
from .run_layout import (
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    MANIFEST,
    OLD_SUFFIX,
    OPTIMIZER_STATE,
    OPTIMIZER_TENSORS,
    PARTIAL_SUFFIX,
    PROMPT_AVERAGE_TENSORS,
    RNG_STATE,
    RNG_TENSORS,
    SCALER_STATE,
    SCHEDULER_STATE,
    STATE_FILE,
    TEMPORARY_CHECKPOINT_DIR,
    checkpoint_dir,
    checkpoint_dirs,
)

logger = logging.getLogger(__name__)


def _to_json(value: Any) -> bytes:
    return json.dumps(value, indent=1).encode()


def _optimizer_files(optimizer: torch.optim.Optimizer) -> tuple[bytes, bytes]:
    """The contents of `OPTIMIZER_TENSORS` (every tensor of the state) and `OPTIMIZER_STATE` (the rest, tensors by
    key)."""
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


class Checkpointer:
    """Writes and restores the checkpoints of one run: the model's adapter, the optimizer, the scheduler, the
    DataLoader generator and every process's random states (and the fp16 scaler), in the run directory's
    `checkpoints/`, keeping the `keep` newest."""

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        generator: torch.Generator,
        run_dir: RunDir,
        keep: int,
    ):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.generator, self.run_dir, self.keep = generator, run_dir, keep
        self.prompt_average: PromptAverage | None = None  # --prompt_averaging gaussian: the loop's, saved with each
        self.restored_prompt_average: dict[str, torch.Tensor] | None = None  # its tensors `restore` found, if any

    def save(self, state: dict, identity: dict) -> None:
        """`checkpoints/epoch_<state["epoch"]>` with the trainer `state` and the run's `identity` (JSON, checked
        when resuming) and the running `prompt_average`, written by the main process into `epoch_N.partial` and
        renamed into place; then the oldest beyond `keep` are removed. A failed write leaves the earlier checkpoints
        as they were."""
        accelerator = self.accelerator
        rng = _rng_state(self.generator)
        rng_all = gather_object([rng]) if accelerator.num_processes > 1 else [rng]  # every process's generators
        output_dir, folder = self.run_dir.path, self.run_dir.folder
        final = checkpoint_dir(output_dir, state["epoch"])
        root = final.parent
        partial, old = final.with_name(final.name + PARTIAL_SUFFIX), final.with_name(final.name + OLD_SUFFIX)
        model = accelerator.unwrap_model(self.model)

        def relative(path: Path) -> str:
            return path.relative_to(output_dir).as_posix()

        def write() -> None:
            root.mkdir(parents=True, exist_ok=True)
            for leftover in root.iterdir():  # of a run killed while writing: recorded whole, removed as ours
                if TEMPORARY_CHECKPOINT_DIR.fullmatch(leftover.name) and leftover.is_dir():
                    folder.remove_owned(relative(leftover), damaged=True)
            try:
                folder.record_dir(relative(partial))  # ours while half-written: --overwrite_output_dir removes it
                folder.record_dir(relative(old))
                partial.mkdir()
                model.save_pretrained(str(partial / ADAPTER_DIR))
                tensors, meta = _optimizer_files(self.optimizer)
                write_file(partial / OPTIMIZER_TENSORS, tensors)
                write_file(partial / OPTIMIZER_STATE, meta)
                write_file(partial / SCHEDULER_STATE, _to_json(self.scheduler.state_dict()))
                rng_tensors = {
                    f"process_{i}.{k}": t.cpu().contiguous() for i, (_, ts) in enumerate(rng_all) for k, t in ts.items()
                }
                write_file(partial / RNG_TENSORS, save_safetensors(rng_tensors))
                write_file(partial / RNG_STATE, _to_json({"processes": [numbers for numbers, _ in rng_all]}))
                if accelerator.scaler is not None:
                    write_file(partial / SCALER_STATE, _to_json(accelerator.scaler.state_dict()))
                if self.prompt_average is not None:
                    write_file(partial / PROMPT_AVERAGE_TENSORS, save_safetensors(self.prompt_average.to_tensors()))
                trainer_state = {**state, "accelerator_step": accelerator.step, "run": identity}
                write_file(partial / STATE_FILE, _to_json(trainer_state))
                flush_tree(partial)  # the modes a plain write gives (a team reads the run), flushed
                files = {
                    str(p.relative_to(partial).as_posix()): {"sha256": sha256_of(p), "size": p.stat().st_size}
                    for p in sorted(partial.rglob("*"))
                    if p.is_file()
                }
                manifest = _to_json({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "files": files})
                write_file(partial / MANIFEST, manifest)
                fsync_dir(partial)
                if final.exists():
                    os.replace(final, old)
                # Each file recorded by its final name before it has it: the run's from the moment it appears there,
                # never a file of unknown origin after a kill (the checks would refuse the resume).
                hashes = {name: entry["sha256"] for name, entry in files.items()}
                hashes[MANIFEST] = hashlib.sha256(manifest).hexdigest()
                folder.record_hashes({relative(final / name): sha for name, sha in hashes.items()}, relative(final))
                os.replace(partial, final)
                fsync_dir(root)
                folder.forget(relative(partial))
            except Exception as err:
                folder.remove_owned(relative(partial))
                if old.exists() and not final.exists():
                    os.replace(old, final)
                    folder.record([relative(final)])
                failure = _write_error(err, final, self.run_dir)
                if failure is None:
                    raise
                raise failure from err
            folder.remove_owned(relative(old), damaged=True)
            for stale in checkpoint_dirs(output_dir)[: -self.keep]:
                folder.remove_owned(relative(stale), damaged=True)  # a file dpt_peft did not write stays
                if stale.exists():
                    logger.warning("Kept %s: it holds files dpt_peft did not write (%s).", stale, list(stale.iterdir()))

        on_main_process(accelerator, write)

    def restore(self, checkpoint: VerifiedCheckpoint) -> None:
        """Restore adapter, optimizer, scheduler, RNG (and fp16 scaler) states on every process, from files whose
        sha256 is checked again as they are read; the tensors of --prompt_averaging are kept in
        `restored_prompt_average` for the loop."""
        accelerator = self.accelerator
        weights = checkpoint.tensors(ADAPTER_WEIGHTS)
        model = accelerator.unwrap_model(self.model)
        result = set_peft_model_state_dict(model, weights)
        missing = [k for k in getattr(result, "missing_keys", []) if ".dpt_" in k or ".lora_" in k]
        if missing:
            raise CheckpointError(
                f"{checkpoint.path / ADAPTER_DIR} does not fill this model's prompts (missing {missing[:3]}); resume "
                "with the arguments of the run that wrote it."
            )
        _restore_optimizer(checkpoint, self.optimizer)
        _restore_scheduler(checkpoint, self.scheduler)
        _restore_rng(checkpoint, accelerator, self.generator)
        if accelerator.scaler is not None and SCALER_STATE in checkpoint.files:
            accelerator.scaler.load_state_dict(checkpoint.json(SCALER_STATE))
        accelerator.step = int(checkpoint.state.get("accelerator_step", 0))
        if PROMPT_AVERAGE_TENSORS in checkpoint.files:
            self.restored_prompt_average = checkpoint.tensors(PROMPT_AVERAGE_TENSORS)


def _write_error(err: Exception, final: Path, run_dir: RunDir) -> OSError | None:
    """The error to raise when writing checkpoint `final` failed with `err` (None: re-raise `err`): a full disk is
    one line, naming what is intact and the flag that continues (`RunDir.continue_advice`)."""
    intact = [p.name for p in checkpoint_dirs(run_dir.path)]
    kept = f"the earlier checkpoints ({', '.join(intact)}) are intact" if intact else "there is no earlier checkpoint"
    fix = f"{kept}; free space on that disk (or lower --checkpoints_to_keep), then {run_dir.continue_advice()}"
    failure = write_failure(err, final, fix)
    if failure is not None or not isinstance(err, OSError):
        return failure
    return OSError(
        err.errno,
        f"Could not write checkpoint {final}: {err}. Nothing of it was kept and {kept}; fix the "
        f"cause, then {run_dir.continue_advice()}",
    )


def _restore_optimizer(checkpoint: VerifiedCheckpoint, optimizer: torch.optim.Optimizer) -> None:
    tensors = checkpoint.tensors(OPTIMIZER_TENSORS)
    meta = checkpoint.json(OPTIMIZER_STATE)
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
            f"{checkpoint.path / OPTIMIZER_STATE} does not fit this optimizer ({type(err).__name__}: {err}); "
            "resume with the arguments of the run that wrote it."
        ) from err


def _restore_scheduler(checkpoint: VerifiedCheckpoint, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    saved = checkpoint.json(SCHEDULER_STATE)
    expected = scheduler.state_dict()
    if not isinstance(saved, dict) or set(saved) != set(expected) or any(saved.get("lr_lambdas") or []):
        raise CheckpointError(
            f"{checkpoint.path / SCHEDULER_STATE} does not hold a state of {type(scheduler).__name__} (keys "
            f"{sorted(saved) if isinstance(saved, dict) else type(saved).__name__}); resume from another checkpoint."
        )
    scheduler.load_state_dict(saved)


def _restore_rng(checkpoint: VerifiedCheckpoint, accelerator: Accelerator, generator: torch.Generator) -> None:
    processes = checkpoint.json(RNG_STATE)["processes"]
    tensors = checkpoint.tensors(RNG_TENSORS)
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
            f"{checkpoint.path / RNG_STATE} / {RNG_TENSORS} hold no valid random states ({type(err).__name__}: "
            f"{err}); resume from another checkpoint."
        ) from err
