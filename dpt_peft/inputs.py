"""Checks of a forward's inputs: the usual mistakes get an error saying the fix, not a shape error inside CLIP."""

from __future__ import annotations

import torch

from .utils.errors import InputTypeError, UserInputError


def check_pixel_values(pixel_values: torch.Tensor) -> None:
    """Catch the usual mistakes before they become shape errors deep inside CLIP."""
    if not isinstance(pixel_values, torch.Tensor):
        raise InputTypeError(
            f"pixel_values must be a tensor [batch, 3, height, width], got {type(pixel_values).__name__}."
        )
    if pixel_values.dim() == 3:
        raise UserInputError(
            f"pixel_values has shape {tuple(pixel_values.shape)}, one image without a batch dimension; pass "
            "pixel_values.unsqueeze(0)."
        )
    if pixel_values.dim() != 4 or pixel_values.shape[0] == 0:
        raise UserInputError(
            f"pixel_values must be a non-empty batch [batch, 3, height, width], got {tuple(pixel_values.shape)}."
        )
    if not pixel_values.is_floating_point():
        raise UserInputError(
            f"pixel_values are {pixel_values.dtype}, raw pixel values; normalize them with the base model's image "
            "processor (processor(images=..., return_tensors='pt').pixel_values)."
        )


def checked_labels(labels, batch_size: int, num_classes: int) -> torch.Tensor:
    """Class indices `[batch]` (lists are accepted); one-hot or out-of-range labels get an error saying the fix."""
    labels = torch.as_tensor(labels)
    if labels.dim() == 2 and labels.shape == (batch_size, num_classes):
        raise UserInputError(
            f"labels have shape {tuple(labels.shape)}, one-hot; pass class indices of shape [batch]: labels.argmax(-1)."
        )
    if labels.dim() != 1 or len(labels) != batch_size or labels.is_floating_point():
        raise UserInputError(
            f"labels must be integer class indices of shape [{batch_size}] (one per image), got {labels.dtype} of "
            f"shape {tuple(labels.shape)}."
        )
    if bool(((labels < 0) | (labels >= num_classes)).any()):  # one device sync per step, not two
        raise UserInputError(f"labels must lie in 0..{num_classes - 1} (the task's classes), got {labels.tolist()}.")
    return labels.long()
