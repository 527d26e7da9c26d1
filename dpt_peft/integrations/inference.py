"""Running a trained adapter on images: `predict` (the transformers pipeline is in `pipeline.py`).

Class-side features are computed once per label space (the model caches them at inference), so a run
over many images pays for the text encoder once.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoImageProcessor

from ..data.images import UNREADABLE_IMAGE_ERRORS, open_rgb
from ..sources import resolve
from ..training.ensemble import zero_shot_ensemble_for_call
from ..utils.errors import MissingInputError, UserInputError

logger = logging.getLogger(__name__)
ImageInput = str | os.PathLike | Image.Image | torch.Tensor
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Prediction:
    source: str  # the path, or "image[i]" for in-memory inputs
    labels: list[str]
    scores: list[float]  # softmax probabilities over the label space, best first


URL_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def expand_paths(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, directories expanded to the image files they contain (sorted)."""
    paths = []
    for item in inputs:
        if URL_SCHEME.match(str(item)):  # Path() would fold "http://host" into "http:/host", a path that does not exist
            raise UserInputError(
                f"{item} is a URL; predict reads image files and folders: download it first, or classify it with "
                "pipeline('dpt-image-classification', ...), which takes http(s) URLs with a size cap and deadline."
            )
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserInputError(f"{path} contains no image files ({', '.join(sorted(IMAGE_SUFFIXES))}).")
            paths.extend(found)
        elif not path.exists():
            raise MissingInputError(f"{path} does not exist.")
        else:
            paths.append(path)
    return paths


def image_processor_for(model) -> object:
    """The base model's image processor, found from its `name_or_path`."""
    source = model.get_base_model().name_or_path
    if not source:
        raise UserInputError("The base model has no name_or_path; pass processor= (its image processor) explicitly.")
    return AutoImageProcessor.from_pretrained(resolve(source))


def load_image(item: ImageInput, index: int) -> tuple[str, Image.Image | torch.Tensor]:
    if isinstance(item, torch.Tensor):
        return f"image[{index}]", item
    if isinstance(item, Image.Image):
        return f"image[{index}]", open_rgb(item)
    return str(item), open_rgb(item)


def to_pixel_values(images: list, processor) -> torch.Tensor:
    if all(isinstance(image, torch.Tensor) for image in images):
        return torch.stack(images)
    if any(isinstance(image, torch.Tensor) for image in images):
        raise UserInputError("Pass either tensors (already preprocessed) or images/paths in one call, not both.")
    return processor(images=images, return_tensors="pt")["pixel_values"]


def predict(
    model,
    images: Iterable[ImageInput],
    top_k: int = 5,
    task: str | None = None,
    processor=None,
    batch_size: int = 64,
    progress: bool = False,
    zero_shot_ensemble: float | None = None,
) -> list[Prediction]:
    """Top-k classes of each image. Images are PIL images, paths, or preprocessed tensors `[3, H, W]`.
    `zero_shot_ensemble`: for this call, the weight of the adapter's probabilities, the rest the zero-shot
    classifier's (default: the adapter's own setting).

    An unreadable or corrupt file is skipped with a warning naming it; it has no `Prediction`.
    """
    with zero_shot_ensemble_for_call(model, zero_shot_ensemble):
        return _predict(model, images, top_k, task, processor, batch_size, progress)


def _predict(
    model, images: Iterable[ImageInput], top_k: int, task: str | None, processor, batch_size: int, progress: bool
) -> list[Prediction]:
    items = [torch.unbind(x) if isinstance(x, torch.Tensor) and x.dim() == 4 else [x] for x in images]
    items = [x for group in items for x in group]
    processor = (
        processor
        if processor is not None
        else (None if all(isinstance(x, torch.Tensor) for x in items) else image_processor_for(model))
    )
    names = model.class_names(task)
    k = min(top_k, len(names))
    device = next(p for p in model.parameters()).device
    results: list[Prediction] = []
    model.eval()
    for start in tqdm(range(0, len(items), batch_size), desc="predict", disable=not progress):
        sources, loaded = [], []
        for index in range(start, min(start + batch_size, len(items))):
            try:
                source, image = load_image(items[index], index)
            except UNREADABLE_IMAGE_ERRORS as err:
                logger.warning("Skipping %s: not a readable image (%s)", items[index], err)
                continue
            sources.append(source)
            loaded.append(image)
        if not loaded:
            continue
        with torch.no_grad():
            logits = model(pixel_values=to_pixel_values(loaded, processor).to(device), task=task).logits
        probabilities = logits.float().softmax(dim=-1)
        scores, indices = probabilities.topk(k, dim=-1)
        for source, row_scores, row_indices in zip(sources, scores.tolist(), indices.tolist()):
            results.append(Prediction(source, [names[i] for i in row_indices], row_scores))
    return results
