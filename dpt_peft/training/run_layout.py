"""What a run directory holds: every file and folder name a run writes and the checkpoint format's names. Which
files are the run's own (the only ones it ever replaces or deletes) is recorded in the folder's manifest
(`utils/write_policy.py`, docs/reliability.md), never decided by names."""

from __future__ import annotations

import os
import re
from pathlib import Path

from peft.utils import SAFETENSORS_WEIGHTS_NAME

from ..sources import TOY_CLIP_ID

RUN_FILE = "run.json"
LOCK_FILE = ".dpt_peft.lock"
TRACKER_DIR = "dpt_peft"  # Accelerate's TensorBoard tracker writes <project_dir>/<this project name>/

# What a run writes into its --output_dir.
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
CURVE_FILE = "training_curve.png"
ADAPTER_DIR = "adapter"
BEST_ADAPTER_DIR = "best_adapter"
LAST_ADAPTER_DIR = "last_adapter"  # --load_best_model_at_end: the last epoch's adapter, when the best differs
SPLITS_DIR = "splits"  # the few-shot split of each benchmark task, as JSON

# The checkpoints: <output_dir>/checkpoints/epoch_N, written as epoch_N.partial and renamed into place (the one it
# replaces is epoch_N.old until then). Every file of one is listed with its sha256 in its MANIFEST.
CHECKPOINTS = "checkpoints"
CHECKPOINT_FORMAT = "dpt_peft-checkpoint"
CHECKPOINT_VERSION = 1
PARTIAL_SUFFIX, OLD_SUFFIX = ".partial", ".old"
CHECKPOINT_DIR = re.compile(r"epoch_(\d+)")
TEMPORARY_CHECKPOINT_DIR = re.compile(rf"epoch_\d+({re.escape(PARTIAL_SUFFIX)}|{re.escape(OLD_SUFFIX)})")
MANIFEST = "manifest.json"
ADAPTER_WEIGHTS = f"{ADAPTER_DIR}/{SAFETENSORS_WEIGHTS_NAME}"  # what `save_pretrained` writes into adapter/
OPTIMIZER_TENSORS = "optimizer.safetensors"  # every tensor of the optimizer state
OPTIMIZER_STATE = "optimizer.json"  # the rest of it, tensors by key
SCHEDULER_STATE = "scheduler.json"
RNG_TENSORS = "rng.safetensors"  # every process's torch and DataLoader generator states
RNG_STATE = "rng.json"  # every process's Python and NumPy states
SCALER_STATE = "scaler.json"  # fp16 only
PROMPT_AVERAGE_TENSORS = "prompt_average.safetensors"  # --prompt_averaging gaussian only: running sums and weight
STATE_FILE = "trainer_state.json"  # `RunState.to_dict` and the run's identity
REQUIRED_CHECKPOINT_FILES = (
    ADAPTER_WEIGHTS,
    OPTIMIZER_TENSORS,
    OPTIMIZER_STATE,
    SCHEDULER_STATE,
    RNG_STATE,
    RNG_TENSORS,
    STATE_FILE,
)
STATE_KEYS = ("epoch", "global_step", "history", "train_seconds", "run")

# What checkpoints of dpt_peft before issue 12 held (Accelerate's save_state); deleted, never loaded.
LEGACY_CHECKPOINT_FILE = re.compile(
    r"(optimizer|scheduler|sampler|dl_state_dict)(_\d+)?\.bin|custom_checkpoint_\d+\.pkl|random_states_\d+\.pkl|"
    r"scaler\.pt|model(_\d+)?\.safetensors"
)


def checkpoint_dir(output_dir: Path, epoch: int) -> Path:
    """Where the checkpoint of `epoch` (0-based) is, once complete."""
    return output_dir / CHECKPOINTS / f"epoch_{epoch}"


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """The checkpoints of a run that were renamed into place (complete when written), oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_DIR.fullmatch(p.name).group(1)))


def continue_options(output_dir: str | os.PathLike) -> dict[str, str | bool]:
    """The TrainArguments values that run an unfinished run again: from its latest checkpoint, or (killed before its
    first one) afresh, replacing only the run's own files; none when the directory holds no run."""
    if checkpoint_dirs(Path(output_dir)):
        return {"resume_from_checkpoint": "latest"}
    return {"overwrite_output_dir": True} if (Path(output_dir) / RUN_FILE).exists() else {}


# The run folders' first word: the prompt methods share DPT's (their runs refuse each other's folders, as before
# 0.6); a LoRA or a linear probe is another kind of adapter, so it has its own.
OUTPUT_PREFIX = {"lora": "lora", "linear_probe": "linear-probe"}


def default_output_dir(model_name_or_path: str | None, method: str = "dpt") -> str:
    """`outputs/dpt-toy` for the toy CLIP, `outputs/dpt-toy-siglip` for the toy SigLIP, else `outputs/dpt-<the
    model's last name part>` (`openai/clip-vit-base-patch16` -> `outputs/dpt-clip-vit-base-patch16`); `lora-` and
    `linear-probe-` in place of `dpt-` for those methods (`outputs/lora-toy`)."""
    name, prefix = model_name_or_path or TOY_CLIP_ID, OUTPUT_PREFIX.get(method, "dpt")
    if name == TOY_CLIP_ID:
        return f"outputs/{prefix}-toy"
    return f"outputs/{prefix}-{Path(name.rstrip('/')).name or 'model'}"
