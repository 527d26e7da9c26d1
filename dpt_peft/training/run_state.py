"""What a training run works with (`Run`, made by `setup`) and what its checkpoints restore (`RunState`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.batching import ImageBatcher, SkipCounter
from ..data.datasets import FewShotData
from ..data.loaders import TrainLoader
from .arguments import TrainArguments
from .checkpoints import Checkpointer
from .recipe import Recipe
from .run_lock import RunLock


@dataclass
class RunState:
    """Where the loop is and what it has recorded so far; a checkpoint's trainer state (`to_dict`)."""

    epochs_done: int = 0
    global_step: int = 0
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    train_images: int = 0
    best_val_accuracy: float | None = None
    best_epoch: int | None = None

    def to_dict(self) -> dict:
        """The trainer state as checkpoints store it: "epoch" is the last epoch done (0-based)."""
        values = asdict(self)
        return {"epoch": values.pop("epochs_done") - 1, **values}

    @classmethod
    def from_dict(cls, state: dict) -> RunState:
        """The state of `to_dict` (keys added later default, so older checkpoints still resume)."""
        return cls(
            epochs_done=state["epoch"] + 1,
            global_step=state["global_step"],
            history=state["history"],
            train_seconds=state["train_seconds"],
            train_images=state.get("train_images", 0),
            best_val_accuracy=state.get("best_val_accuracy"),
            best_epoch=state.get("best_epoch"),
        )


@dataclass
class Run:
    """Everything the loop works with, made by `setup`."""

    args: TrainArguments
    recipe: Recipe
    accelerator: Accelerator
    tasks: dict[str, FewShotData]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loaders: dict[str, TrainLoader]
    test_loaders: dict[str, DataLoader]
    val_loaders: dict[str, DataLoader]  # empty without --eval_every
    skips: SkipCounter  # unreadable images met by the decoding loaders' workers and the cache
    batchers: tuple[ImageBatcher, ImageBatcher]  # train, test
    generator: torch.Generator  # shuffles the training loaders, reseeded every epoch
    checkpointer: Checkpointer
    identity: dict
    steps_per_epoch: int
    trainable_parameters: int
    state: RunState
    progress: tqdm
    lock: RunLock | None = None  # of --output_dir, held by the main process
    frozen_val_features: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # per task, per batch

    @property
    def multitask(self) -> bool:
        return len(self.tasks) > 1

    @property
    def input_pipeline(self) -> str:
        """How the training images came: decoded once and augmented on the device, or decoded by PIL every epoch."""
        return "decoded_cache" if any(loader.augmenter is not None for loader in self.train_loaders.values()) else "pil"
