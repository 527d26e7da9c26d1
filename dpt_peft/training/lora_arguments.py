"""`LoraArguments`: the flags of `--method lora` (CLIP-LoRA's recipe, `recipe.LoraRecipe`), a base of `TrainArguments`,
and their checks: each value refused in one line naming the flag, DPT's recipe flags refused with lora (they would
have no effect) and these refused with any other method, and a lora run's --epochs resolved (default --shots)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from ..lora_adapter import PROJECTIONS
from ..utils.errors import UserInputError
from .recipe import LoraRecipe, Recipe

FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without importing torch here
# DPT's optimization flags, which a lora run has its own of (or no use for): given with --method lora, refused.
DPT_RECIPE_FIELDS = {
    "visual_lr": "--lora_lr",
    "text_lr": "--lora_lr",
    "visual_warmup_epochs": "no warm-up (CLIP-LoRA has none)",
    "text_warmup_epochs": "no warm-up (CLIP-LoRA has none)",
    "warmup_lr": "no warm-up (CLIP-LoRA has none)",
    "momentum": "AdamW with CLIP-LoRA's betas",
    "weight_decay": "--lora_weight_decay",
    "guidance_epochs": "plain cross-entropy (CLIP-LoRA has no guidance loss)",
    "prompt_averaging": "the last iteration's LoRA matrices (as CLIP-LoRA)",
}


def _flag(default, text: str):
    return field(default=default, metadata={"help": text})


@dataclass
class LoraArguments:
    """The settings of --method lora; defaults: CLIP-LoRA's (docs/method.md, "LoRA (CLIP-LoRA recipe)")."""

    lora_r: int = _flag(LoraRecipe.r, "Rank of the LoRA matrices.")
    lora_alpha: float = _flag(LoraRecipe.alpha, "LoRA alpha; the scaling is alpha / sqrt(r).")
    lora_dropout: float = _flag(LoraRecipe.dropout, "Dropout on the input of each LoRA branch.")
    lora_targets: str = _flag(",".join(LoraRecipe.targets), "Attention projections with LoRA, among q, k, v, o.")
    lora_encoder: Literal["both", "text", "vision"] = _flag(LoraRecipe.encoder, "The towers with LoRA.")
    lora_layers: str = _flag(LoraRecipe.layers, "Layers with LoRA in each tower: 'all' or 0-based, e.g. 8,9,10,11.")
    lora_lr: float = _flag(LoraRecipe.lr, "AdamW learning rate, cosine-annealed to 1e-6 over the iterations.")
    lora_weight_decay: float = _flag(LoraRecipe.weight_decay, "AdamW weight decay.")
    iterations_per_shot: int = _flag(
        LoraRecipe.iterations_per_shot,
        "Iterations per shot: this x --shots in all, of --batch_size images each; --epochs splits them into equal "
        "parts, each ended by a checkpoint (--shots parts unless given).",
    )
    lora_template: str = _flag(LoraRecipe.template, "The classifier's prompt, with '{}' for the class name.")
    lora_logit_scale: float = _flag(LoraRecipe.logit_scale, "Scale of the cosine logits.")

    def check_lora(self) -> None:
        """Each --method lora setting checked; with another method, none of them may be given."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.method != "lora":
            given = next((name for name in LORA_FIELDS if getattr(self, name) != defaults[name]), None)
            if given:
                raise UserInputError(f"--{given} is a setting of --method lora; drop it, or train --method lora.")
            return
        given = next((name for name in DPT_RECIPE_FIELDS if getattr(self, name) != defaults[name]), None)
        if given:
            raise UserInputError(f"--{given} is DPT's; --method lora uses {DPT_RECIPE_FIELDS[given]} instead.")
        if len(self.datasets) > 1:
            raise UserInputError("--method lora trains one task (CLIP-LoRA's classifier); give one --dataset.")
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise UserInputError(f"--lora_r {self.lora_r} is the LoRA matrices' rank: use 1 or more (CLIP-LoRA: 2).")
        for name in ("lora_alpha", "lora_lr", "lora_logit_scale"):
            value = getattr(self, name)
            if not math.isfinite(value) or not 0 < value <= FLOAT32_MAX:
                raise UserInputError(
                    f"--{name} {value} must be a positive, finite number (CLIP-LoRA: {defaults[name]})."
                )
        if not 0 <= self.lora_dropout < 1:
            raise UserInputError(f"--lora_dropout {self.lora_dropout} is a probability: use a value in [0, 1).")
        if not math.isfinite(self.lora_weight_decay) or self.lora_weight_decay < 0:
            raise UserInputError(f"--lora_weight_decay {self.lora_weight_decay} must be 0 or more (CLIP-LoRA: 0.01).")
        if not self.lora_target_letters or not set(self.lora_target_letters) <= set(PROJECTIONS):
            raise UserInputError(
                f"--lora_targets {self.lora_targets!r}: name projections among q, k, v, o, e.g. q,k,v."
            )
        if self.lora_template.count("{}") != 1:
            raise UserInputError(f"--lora_template {self.lora_template!r} needs exactly one '{{}}' for the class name.")
        if self.iterations_per_shot < 1:
            raise UserInputError(
                f"--iterations_per_shot {self.iterations_per_shot} must be 1 or more (CLIP-LoRA: 500)."
            )
        if self.epochs == Recipe.epochs:  # not given: one part per shot (500 iterations each in CLIP-LoRA's recipe)
            self.epochs = self.shots
        iterations = self.iterations_per_shot * self.shots
        if iterations % self.epochs:
            raise UserInputError(
                f"--epochs {self.epochs} must divide the {iterations} iterations of this lora run (--iterations_per_"
                f"shot x --shots): each epoch is an equal part of them; e.g. --epochs {self.shots}."
            )

    @property
    def unused_fields(self) -> tuple[str, ...]:
        """The settings that are no part of this run's identity: these, unless it is a lora run."""
        return () if self.method == "lora" else LORA_FIELDS

    @property
    def lora_target_letters(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.strip() for t in self.lora_targets.split(",") if t.strip()))

    @property
    def lora_recipe(self) -> LoraRecipe:
        """The --method lora recipe of these settings."""
        return LoraRecipe(
            r=self.lora_r,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            encoder=self.lora_encoder,
            layers=self.lora_layers,
            targets=self.lora_target_letters,
            lr=self.lora_lr,
            weight_decay=self.lora_weight_decay,
            iterations_per_shot=self.iterations_per_shot,
            template=self.lora_template,
            logit_scale=self.lora_logit_scale,
            shots=self.shots,
            epochs=self.epochs,
        )


LORA_FIELDS = tuple(f.name for f in dataclasses.fields(LoraArguments))
