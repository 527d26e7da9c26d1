"""The paper's optimization recipe (docs/method.md, section 5): SGD in two parameter groups, their learning-rate
schedules, and when the general-knowledge guidance loss applies.

Which group a parameter joins is decided by its kind (`ParameterKind`, from the layer attribute it lives in),
never by its name: a new kind of prompt must be given a group here, or building the optimizer fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..layer import ParameterKind
from ..peft_model import DPTPeftModel
from ..utils.errors import UserInputError

VISUAL_GROUP, TEXT_GROUP = "visual", "text"
GROUP_OF_KIND = {
    ParameterKind.VISUAL_PROMPTS: VISUAL_GROUP,
    ParameterKind.CLASS_AWARE: VISUAL_GROUP,
    ParameterKind.TEXT_CONTEXT: TEXT_GROUP,
}


@dataclass(frozen=True)
class Recipe:
    """The optimization settings of a run, resolved (defaults: the paper's, for DPT over 60 epochs)."""

    visual_lr: float = 0.01  # visual prompts and CAVPT
    text_lr: float = 0.002  # the text context
    visual_warmup_epochs: int = 10  # 1 on ImageNet (the catalog's per-dataset value)
    text_warmup_epochs: int = 1
    warmup_lr: float = 1e-5  # during the constant warm-up
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 60
    guidance_epochs: int = 30  # general-knowledge guidance first (`guidance_epochs_for`)

    @classmethod
    def for_method(cls, method: str = "dpt", epochs: int | None = None, **settings) -> Recipe:
        """The paper's recipe for `method` over `epochs` (default 60), with guidance as the reference trainers have
        it; `settings` replace any other value."""
        epochs = cls.epochs if epochs is None else epochs
        settings.setdefault("guidance_epochs", guidance_epochs_for(method, epochs))
        return cls(epochs=epochs, **settings)

    def guidance(self, epoch: int) -> bool:
        """Whether the guidance loss applies in `epoch` (0-based)."""
        return epoch < self.guidance_epochs


def uses_guidance(method: str) -> bool:
    """The reference CoOp and VPT trainers train with plain cross-entropy; VPT+CoOp and DPT start with guidance."""
    return method not in ("coop", "vpt")


def guidance_epochs_for(method: str, epochs: int) -> int:
    """Half the epochs for the methods the reference trains with guidance, else 0."""
    return epochs // 2 if uses_guidance(method) else 0


def recipe_lr_factor(
    base_lr: float, warmup_epochs: int, warmup_lr: float, epochs: int, steps_per_epoch: int
) -> Callable[[int], float]:
    """Dassl's `ConstantWarmupScheduler` around `CosineAnnealingLR(T_max=epochs)` with `WARMUP_RECOUNT=True`, per
    epoch: `warmup_lr` for the warm-up epochs, then a cosine that starts counting at 0 when the warm-up ends (so it
    never reaches 0: 8.1e-4 x base at the last of 60 epochs after 10 warm-up epochs)."""

    def factor(step: int) -> float:
        epoch = step // steps_per_epoch
        if epoch < warmup_epochs:
            return warmup_lr / base_lr
        return 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))

    return factor


def parameter_groups(model: DPTPeftModel) -> dict[str, list[torch.nn.Parameter]]:
    """Trainable prompt parameters of the active adapter by optimizer group, from their kinds."""
    groups: dict[str, list[torch.nn.Parameter]] = {VISUAL_GROUP: [], TEXT_GROUP: []}
    for key, (kind, parameter) in model.adapter_parameters().items():
        if parameter.requires_grad:
            if kind not in GROUP_OF_KIND:
                raise ValueError(f"{key} is a {kind.value} parameter, which has no optimizer group in GROUP_OF_KIND.")
            groups[GROUP_OF_KIND[kind]].append(parameter)
    covered = {id(p) for params in groups.values() for p in params}
    stray = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if stray:
        raise UserInputError(f"{stray[0]} is trainable but is not a DPT prompt parameter; freeze it before training.")
    return groups


def build_optimizer(model: DPTPeftModel, recipe: Recipe) -> torch.optim.SGD:
    """SGD with two groups: visual prompts + CAVPT (first), and the text context."""
    groups = parameter_groups(model)
    settings = {
        VISUAL_GROUP: (recipe.visual_lr, recipe.visual_warmup_epochs),
        TEXT_GROUP: (recipe.text_lr, recipe.text_warmup_epochs),
    }
    return torch.optim.SGD(
        [
            {"params": params, "lr": settings[name][0], "warmup_epochs": settings[name][1], "name": name}
            for name, params in groups.items()
            if params
        ],
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
    )


def build_scheduler(
    optimizer: torch.optim.SGD, recipe: Recipe, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Each group's warm-up then restarted cosine (`recipe_lr_factor`), stepped once per optimizer update."""
    factors = [
        recipe_lr_factor(group["lr"], group["warmup_epochs"], recipe.warmup_lr, recipe.epochs, steps_per_epoch)
        for group in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
