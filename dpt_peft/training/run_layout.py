"""What a run directory holds: every file and folder name a run writes and the checkpoint format's names. Which
files are the run's own (the only ones it ever replaces or deletes) is recorded in the folder's manifest
(`utils/write_policy.py`, docs/reliability.md), never decided by names."""

from __future__ import annotations

import os
import re
from pathlib import Path

RUN_FILE = "run.json"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
LOCK_FILE = ".dpt_peft.lock"
TRACKER_DIR = "dpt_peft"  # Accelerate's TensorBoard tracker writes <project_dir>/<this project name>/
CHECKPOINT_FORMAT = "dpt_peft-checkpoint"
CHECKPOINT_VERSION = 1

# What a run writes into its --output_dir.
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
CURVE_FILE = "training_curve.png"
ADAPTER_DIR = "adapter"
BEST_ADAPTER_DIR = "best_adapter"
LAST_ADAPTER_DIR = "last_adapter"  # --load_best_model_at_end: the last epoch's adapter, when the best differs
SPLITS_DIR = "splits"  # the few-shot split of each benchmark task, as JSON

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
