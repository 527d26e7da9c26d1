"""A run's directory: its identity, per-epoch checkpoints, and resuming from them.

Checkpoints hold the adapter (not the frozen CLIP), the optimizer, scheduler and RNG states; each is written to
a temporary directory and renamed into place, so a run killed at any moment leaves only complete checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from accelerate import Accelerator
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from .arguments import TrainArguments

RUN_FILE = "run.json"
STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"


def normalized(value) -> object:
    """`value` as it reads back from JSON, so a run's identity compares equal to the one on disk."""
    return json.loads(json.dumps(value, default=str))


def _first_difference(old: dict, new: dict) -> str:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return "none"


def prepare_output_dir(args: TrainArguments, identity: dict, accelerator: Accelerator) -> None:
    """Refuse to mix two different runs in one directory (unless --overwrite_output_dir)."""
    output_dir = Path(args.output_dir)
    run_file = output_dir / RUN_FILE
    if args.resume_from_checkpoint:
        return  # the checkpoint's own run file is checked on resume
    if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite_output_dir:
        if not run_file.exists():
            raise ValueError(
                f"--output_dir {output_dir} is not empty and holds no dpt_peft run; choose another --output_dir or "
                "pass --overwrite_output_dir."
            )
        previous = json.loads(run_file.read_text())
        if previous != identity:
            raise ValueError(
                f"--output_dir {output_dir} holds a different run ({_first_difference(previous, identity)}); pass "
                "--overwrite_output_dir to replace it, --resume_from_checkpoint to continue it, or choose another "
                "--output_dir."
            )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if output_dir.exists() and (args.overwrite_output_dir or run_file.exists()):
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(identity, indent=2))
    accelerator.wait_for_everyone()


def register_adapter_only_checkpoints(accelerator: Accelerator) -> None:
    """Checkpoints store the adapter's tensors, not the frozen CLIP (hundreds of MB for ViT-B)."""

    def save(models, weights, output_dir):
        for model in models:
            accelerator.unwrap_model(model).save_pretrained(
                os.path.join(output_dir, "adapter"), is_main_process=accelerator.is_main_process
            )
        weights.clear()

    def load(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            weights = load_file(os.path.join(input_dir, "adapter", "adapter_model.safetensors"))
            set_peft_model_state_dict(model, weights)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.exists():
        return []
    return sorted((p for p in root.glob("epoch_*") if (p / STATE_FILE).exists()), key=lambda p: int(p.name[6:]))


def save_checkpoint(accelerator: Accelerator, args: TrainArguments, state: dict, identity: dict) -> None:
    output_dir = Path(args.output_dir)
    final = output_dir / CHECKPOINTS / f"epoch_{state['epoch']}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps({**state, "run": identity}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in checkpoint_dirs(output_dir)[: -args.checkpoints_to_keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def resolve_checkpoint(args: TrainArguments) -> Path:
    if args.resume_from_checkpoint == "latest":
        found = checkpoint_dirs(Path(args.output_dir))
        if not found:
            raise ValueError(
                f"--resume_from_checkpoint latest: no checkpoint in {Path(args.output_dir) / CHECKPOINTS}."
            )
        return found[-1]
    path = Path(args.resume_from_checkpoint)
    if not (path / STATE_FILE).exists():
        raise ValueError(f"--resume_from_checkpoint {path} is not a complete dpt_peft checkpoint (no {STATE_FILE}).")
    return path


def load_checkpoint_state(args: TrainArguments, identity: dict) -> tuple[Path, dict]:
    """The checkpoint to resume from and its trainer state, refused when it belongs to another run."""
    path = resolve_checkpoint(args)
    state = json.loads((path / STATE_FILE).read_text())
    if state["run"] != identity:
        raise ValueError(
            f"Checkpoint {path} was made with another config ({_first_difference(state['run'], identity)}); resume "
            "with the same arguments, or start a new run in another --output_dir."
        )
    return path, state
