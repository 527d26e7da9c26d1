"""The paper's optimization recipe (docs/method.md, section 5): SGD in two parameter groups, their learning-rate
schedules, and when the general-knowledge guidance loss applies; and beside it `LoraRecipe`, CLIP-LoRA's (AdamW, a
per-step cosine over 500 x shots iterations) for `--method lora`.

Which group a parameter joins is decided by its kind (`ParameterKind`, from the layer attribute it lives in),
never by its name: a new kind of prompt must be given a group here, or building the optimizer fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..layer import ParameterKind
from ..lora_adapter import CLIP_LORA_LOGIT_SCALE, CLIP_LORA_TEMPLATE
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

    def learning_rate_flags(self) -> str:
        """The flags that set this recipe's learning rates, with their values (for the divergence messages)."""
        return f"--visual_lr {self.visual_lr}, --text_lr {self.text_lr}"


@dataclass(frozen=True)
class LoraRecipe:
    """CLIP-LoRA's recipe (MaxZanella/CLIP-LoRA at 358f0d7; docs/method.md, "LoRA (CLIP-LoRA recipe)"), every value
    an option (`--lora_*`, `--iterations_per_shot`). The run trains `iterations_per_shot` x shots iterations of
    `--batch_size` images, the loop's epochs being equal parts of them (one checkpoint each; `--epochs`, default
    --shots)."""

    r: int = 2  # rank of every LoRA matrix (run_utils.py: --r 2)
    alpha: float = 1.0  # scaling alpha / sqrt(r) (run_utils.py: --alpha 1; loralib/layers.py: alpha/math.sqrt(r))
    dropout: float = 0.25  # on the input of each LoRA branch (run_utils.py: --dropout_rate 0.25)
    encoder: str = "both"  # towers with LoRA: both, text, vision (run_utils.py: --encoder both)
    layers: str = "all"  # layers of each tower: all, or 0-based indices (run_utils.py: --position all)
    targets: tuple[str, ...] = ("q", "k", "v")  # attention projections (run_utils.py: --params q k v)
    lr: float = 2e-4  # AdamW's (run_utils.py: --lr 2e-4)
    weight_decay: float = 1e-2  # AdamW's (lora.py; 1e2 before commit 37a196d, a typo)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's (lora.py)
    eta_min: float = 1e-6  # the cosine's floor (lora.py: CosineAnnealingLR(total_iters, eta_min=1e-6))
    iterations_per_shot: int = 500  # total iterations = 500 x shots (lora.py: n_iters * shots; run_utils.py: 500)
    template: str = CLIP_LORA_TEMPLATE  # every dataset's (datasets/*.py: template = ['a photo of a {}.'])
    logit_scale: float = CLIP_LORA_LOGIT_SCALE  # main.py: logit_scale = 100
    shots: int = 16
    epochs: int = 16  # equal parts of the iterations, each ended by a checkpoint

    @property
    def iterations(self) -> int:
        """The optimizer's iterations of the run (at one batch per iteration)."""
        return self.iterations_per_shot * self.shots

    @property
    def iterations_per_epoch(self) -> int:
        return self.iterations // self.epochs

    def guidance(self, epoch: int) -> bool:
        """CLIP-LoRA trains with plain cross-entropy: never DPT's guidance loss."""
        return False

    def learning_rate_flags(self) -> str:
        return f"--lora_lr {self.lr}"


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


def build_lora_optimizer(model: torch.nn.Module, recipe: LoraRecipe) -> torch.optim.AdamW:
    """AdamW over every trainable LoRA matrix (CLIP-LoRA's `get_lora_parameters`); any other trainable parameter
    fails here instead of training silently."""
    parameters = [p for _, (kind, p) in model.adapter_parameters().items() if kind is ParameterKind.LORA]
    covered = {id(p) for p in parameters}
    stray = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if stray:
        raise UserInputError(f"{stray[0]} is trainable but is not a LoRA matrix; freeze it before training.")
    group = {"params": [p for p in parameters if p.requires_grad], "name": "lora"}
    return torch.optim.AdamW([group], lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)


def build_lora_scheduler(
    optimizer: torch.optim.Optimizer, recipe: LoraRecipe, total_steps: int
) -> torch.optim.lr_scheduler.CosineAnnealingLR:
    """CLIP-LoRA's `CosineAnnealingLR(optimizer, total_iters, eta_min=1e-6)`, stepped once per optimizer update."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=recipe.eta_min)
