"""What a training run works with (`Run`, made by `setup`) and what its checkpoints restore (`RunState`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..data.datasets import FewShotData
from ..data.run_loaders import RunLoaders
from .arguments import TrainArguments
from .checkpoints import Checkpointer
from .prompt_averaging import PromptAverage
from .recipe import Recipe
from .run_dir import RunDir


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


@dataclass(kw_only=True)
class Run:
    """Everything the loop works with, made by `setup`."""

    args: TrainArguments
    recipe: Recipe
    accelerator: Accelerator
    tasks: dict[str, FewShotData]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loaders: RunLoaders  # prepared by Accelerate; their generator is reseeded every epoch, their skips are the run's
    run_dir: RunDir  # --output_dir, locked by the main process until the run ends
    checkpointer: Checkpointer
    identity: dict
    steps_per_epoch: int
    state: RunState
    progress: tqdm
    frozen_val_features: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # per task, per batch
    prompt_average: PromptAverage | None = None  # --prompt_averaging gaussian: set by the loop, saved each epoch

    @property
    def multitask(self) -> bool:
        return len(self.tasks) > 1

    @property
    def trainable_parameters(self) -> int:
        return self.accelerator.unwrap_model(self.model).get_nb_trainable_parameters()[0]

    @property
    def input_pipeline(self) -> str:
        """How the training images came: decoded once and augmented on the device, or decoded by PIL every epoch."""
        return "decoded_cache" if any(loader.augmenter is not None for loader in self.loaders.train.values()) else "pil"
