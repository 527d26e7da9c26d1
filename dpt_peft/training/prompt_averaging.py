"""Gaussian prompt aggregation (GPA, PromptSRC, Khattak et al., ICCV 2023): the adapter a run saves is a weighted
average of its prompt parameters at the end of every epoch, the weights a Gaussian over the epochs.

As PromptSRC's trainer (muzairkhattak/PromptSRC, trainers/promptsrc.py at bb95c77): the weight of epoch a (1-based,
a = 1..N) is the normal density N(a; mean, std), normalized to sum 1 over the N epochs (lines 264-270); at the end of
each epoch, after its last update, the prompts times their epoch's weight are added to a running sum (lines 320-330);
after the last epoch the sum is the model used for the test (lines 332-335). PromptSRC sums its whole state dict, whose
frozen part the normalized weights leave as it was; only the prompts (`adapter_parameters()`) are summed here.
PromptSRC's configs give the mean and std in epochs (base-to-new: 15 and 1 of 20 epochs; few-shot 30 and 30 of 50);
the defaults here are the base-to-new ones as fractions of --epochs (0.75 and 0.05), so they follow the schedule.

The running sum (float64, on the CPU: the same numbers on any device count) and its weight are part of every
checkpoint, so a run killed after any epoch resumes to the same average bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..utils.errors import UserInputError

DEFAULT_MEAN_FRACTION = 15 / 20  # PromptSRC's base-to-new config: mean at epoch 15 of 20
DEFAULT_STD_FRACTION = 1 / 20  # and std 1 epoch
TOTAL_WEIGHT_KEY = "total_weight"
SUM_PREFIX = "sum."


def gaussian_epoch_weights(epochs: int, mean: float, std: float) -> list[float]:
    """The weight of each epoch (0-based index e is PromptSRC's epoch e + 1): N(e + 1; mean, std), summing to 1;
    empty when the density is 0 at every epoch (a mean far outside the run)."""
    density = [
        math.exp(-0.5 * ((epoch - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for epoch in range(1, epochs + 1)
    ]
    total = sum(density)
    return [value / total for value in density] if total > 0 else []


def resolved_mean_std(epochs: int, mean: float | None, std: float | None) -> tuple[float, float]:
    """--prompt_averaging_mean and _std in epochs; None: PromptSRC's base-to-new values scaled to `epochs`."""
    return (
        DEFAULT_MEAN_FRACTION * epochs if mean is None else mean,
        DEFAULT_STD_FRACTION * epochs if std is None else std,
    )


def epoch_weights(epochs: int, mean: float | None, std: float | None) -> list[float]:
    """The weights of --prompt_averaging gaussian, per epoch (0-based)."""
    return gaussian_epoch_weights(epochs, *resolved_mean_std(epochs, mean, std))


def check_prompt_averaging(averaging: str, mean: float | None, std: float | None, epochs: int, save_best: bool) -> None:
    """The refusals of the --prompt_averaging flags. With --save_best the final adapter would be both the average and
    the best validation epoch's: refused rather than one silently winning."""
    if averaging != "gaussian":
        given = [name for name, value in (("mean", mean), ("std", std)) if value is not None]
        if given:
            raise UserInputError(f"--prompt_averaging_{given[0]} applies with --prompt_averaging gaussian; add it.")
        return
    if save_best:
        raise UserInputError(
            "--prompt_averaging gaussian saves the average of the epochs' prompts, --save_best "
            "(--load_best_model_at_end) the best validation epoch's: choose one."
        )
    if std is not None and not (math.isfinite(std) and std > 0):
        raise UserInputError(f"--prompt_averaging_std {std} must be a positive number of epochs, e.g. 1.")
    if mean is not None and not math.isfinite(mean):
        raise UserInputError(f"--prompt_averaging_mean {mean} must be an epoch (1-based), e.g. {0.75 * epochs:g}.")
    if not epoch_weights(epochs, mean, std):
        raise UserInputError(
            f"--prompt_averaging_mean {mean} with --prompt_averaging_std {std} gives no weight to any of the "
            f"{epochs} epochs; put the mean within 1..{epochs} or widen the std."
        )


@dataclass
class PromptAverage:
    """The running Gaussian-weighted sum of an adapter's prompt parameters (by their saved key) and its weight."""

    weights: list[float]  # per epoch, 0-based
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    total_weight: float = 0.0

    def add(self, epoch: int, parameters: dict[str, torch.Tensor]) -> None:
        """Add the prompts at the end of `epoch` (0-based) with that epoch's weight."""
        weight = self.weights[epoch]
        for key, parameter in parameters.items():
            weighted = parameter.detach().to(device="cpu", dtype=torch.float64) * weight
            self.sums[key] = self.sums[key] + weighted if key in self.sums else weighted
        self.total_weight += weight

    def average(self) -> dict[str, torch.Tensor]:
        """The weighted average so far (float64), by key."""
        return {key: value / self.total_weight for key, value in self.sums.items()}

    def load_into(self, parameters: dict[str, torch.nn.Parameter]) -> None:
        """Put the average into the adapter's prompts (each in its own dtype and device)."""
        averaged = self.average()
        if set(averaged) != set(parameters):
            raise ValueError(f"The prompt average holds {sorted(averaged)[:3]}, the adapter {sorted(parameters)[:3]}.")
        with torch.no_grad():
            for key, parameter in parameters.items():
                parameter.copy_(averaged[key].to(parameter.dtype))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores (safetensors): every running sum and the total weight, as float64."""
        tensors = {f"{SUM_PREFIX}{key}": value.contiguous() for key, value in self.sums.items()}
        tensors[TOTAL_WEIGHT_KEY] = torch.tensor(self.total_weight, dtype=torch.float64)
        return tensors

    @classmethod
    def from_tensors(cls, weights: list[float], tensors: dict[str, torch.Tensor]) -> PromptAverage:
        """The state `to_tensors` stored (KeyError without the total weight)."""
        sums = {key[len(SUM_PREFIX) :]: value for key, value in tensors.items() if key.startswith(SUM_PREFIX)}
        return cls(weights, sums, float(tensors[TOTAL_WEIGHT_KEY].item()))
