"""The zero-shot ensemble at inference, as `evaluate`, `predict` and the pipeline set it: the weight of the adapter's
probabilities, the rest going to the frozen zero-shot classifier's (`DPTConfig.zero_shot_ensemble`, applied by the
model's `set_zero_shot_ensemble`). Here only what the tools share: the check of a given weight, setting it (for good on
a model loaded for one evaluation, or for one call), and the value in effect, which every report records."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..config_checks import checked_zero_shot_ensemble as checked_weight
from ..utils.errors import UserInputError


def ensemble_in_effect(model: torch.nn.Module) -> float | None:
    """The weight the model's active adapter classifies with (None: the adapter alone, or a model without one)."""
    return getattr(getattr(model, "active_peft_config", None), "zero_shot_ensemble", None)


def set_zero_shot_ensemble(model: torch.nn.Module, weight: float | None) -> None:
    """Set the active adapter's weight for good; None leaves the adapter's own. A model that cannot mix in zero-shot
    (no `set_zero_shot_ensemble`, e.g. a LoRA classifier) is refused when a weight is given."""
    weight = checked_weight(weight)
    if weight is None:
        return
    setter = getattr(model, "set_zero_shot_ensemble", None)
    if setter is None:
        raise UserInputError(
            f"zero_shot_ensemble: a {type(model).__name__} has no zero-shot classifier to mix in (a DPT adapter has); "
            "drop --zero_shot_ensemble."
        )
    setter(weight)


@contextmanager
def zero_shot_ensemble_for_call(model: torch.nn.Module, weight: float | None) -> Iterator[None]:
    """`weight` for the calls inside only (as `candidate_labels`): the adapter's own setting is put back after."""
    if checked_weight(weight) is None:
        yield
        return
    previous = ensemble_in_effect(model)
    set_zero_shot_ensemble(model, weight)
    try:
        yield
    finally:
        model.set_zero_shot_ensemble(previous)
