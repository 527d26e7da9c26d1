"""Batches for the model: collate functions that decode, augment (training) and preprocess images into
`{"pixel_values", "labels"}`, and the count of unreadable images they skip.

Images are decoded in the collate function, not by `datasets`, so that an unreadable or corrupt image is skipped with
a warning naming it (and counted) instead of stopping a long run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from datasets import Dataset, Image
from PIL import Image as PILImage

from .augmentation import crop_draws, processor_crop_size, random_resized_crop
from .images import UNREADABLE_IMAGE_ERRORS, decode_image_value

logger = logging.getLogger(__name__)
INDEX_COLUMN = "__index__"  # a training row's position, which seeds its augmentation
SKIPPED_KEY = "skipped"


def undecoded(dataset: Dataset, image_column: str) -> Dataset:
    """Keep images as bytes/paths; the batchers decode them and skip the ones that fail."""
    if isinstance(dataset.features[image_column], Image):
        return dataset.cast_column(image_column, Image(decode=False))
    return dataset


def with_index(dataset: Dataset) -> Dataset:
    """Add `__index__` so augmentation can be seeded per sample."""
    return dataset.add_column(INDEX_COLUMN, list(range(len(dataset))))


def image_name(value) -> str:
    """How an unreadable image is named in logs and counts: its path."""
    return str(value.get("path") if isinstance(value, dict) else value)


@dataclass
class ImageBatcher:
    """Collate function: decode, augment (training), preprocess with the base model's image processor.

    Augmentation draws from a generator seeded by (seed, epoch, sample), so a resumed run sees the same
    crops as an uninterrupted one.
    """

    processor: object
    image_column: str
    label_column: str
    train: bool = False
    seed: int = 0
    min_crop_scale: float = 0.08
    epoch: int = 0
    skipped: list[str] = field(default_factory=list)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor] | None:
        images, labels = [], []
        for row in rows:
            value = row[self.image_column]
            try:
                image = decode_image_value(value)
            except (*UNREADABLE_IMAGE_ERRORS, KeyError) as err:
                self._skip(value, err)
                continue
            if self.train:
                rng = crop_draws(self.seed, self.epoch, row[INDEX_COLUMN])
                image = random_resized_crop(image, processor_crop_size(self.processor), rng, self.min_crop_scale)
                if rng.random() < 0.5:
                    image = image.transpose(PILImage.FLIP_LEFT_RIGHT)
            images.append(image)
            labels.append(row[self.label_column])
        if not images:
            return None
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": torch.tensor(labels, dtype=torch.long)}

    def _skip(self, value, err: Exception) -> None:
        """Log and count an unreadable image once, however many epochs meet it."""
        where = image_name(value)
        if where not in self.skipped:
            self.skipped.append(where)
            logger.warning("Skipping unreadable image %s (%s: %s)", where, type(err).__name__, err)


@dataclass
class ReportingImageBatcher(ImageBatcher):
    """`ImageBatcher` for DataLoader workers.

    - Its batches also carry the images they skipped: `batch["skipped"]` is a list of (path, "Error: message").
      A worker's own `skipped` list dies with the worker; these reach the main process, where the loader that
      yields the batch (`loaders.TrainLoader`, `loaders.EvalLoader`) counts and logs each image once with
      `SkipCounter.take` and hands on `{"pixel_values", "labels"}` only. A batch of unreadable images only is
      `{"skipped": [...]}`.
    - `epoch` lives in shared memory, so persistent workers (which keep the copy of the collate they started
      with) crop by the epoch the main process sets, not by the one they started in.
    """

    @property
    def epoch(self) -> int:
        return int(self._shared_epoch.item())

    @epoch.setter
    def epoch(self, value: int) -> None:
        if "_shared_epoch" not in self.__dict__:  # the dataclass __init__ sets the first value
            self._shared_epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._shared_epoch.fill_(int(value))

    def __call__(self, rows: list[dict]) -> dict:
        self._batch_skipped: list[tuple[str, str]] = []
        batch = super().__call__(rows) or {}
        batch[SKIPPED_KEY] = self._batch_skipped
        return batch

    def _skip(self, value, err: Exception) -> None:  # recorded here, logged once by the main process's SkipCounter
        where = image_name(value)
        if where not in self.skipped:
            self.skipped.append(where)
        self._batch_skipped.append((where, f"{type(err).__name__}: {err}"))


class SkipCounter:
    """The unreadable images of a run, each counted and logged once, in the process that owns it."""

    def __init__(self, paths: Sequence[str] = ()):
        self.skipped: list[str] = list(dict.fromkeys(paths))
        self._seen = set(self.skipped)

    def __len__(self) -> int:
        return len(self.skipped)

    def add(self, path: str, reason: str | None = None, log: bool = True) -> bool:
        """Record `path`; True (and a warning) the first time."""
        if path in self._seen:
            return False
        self._seen.add(path)
        self.skipped.append(path)
        if log:
            logger.warning("Skipping unreadable image %s (%s)", path, reason or "unreadable")
        return True

    def update(self, paths: Sequence[str]) -> None:
        """Record images already logged elsewhere (e.g. `DecodedImageCache.skipped`)."""
        for path in paths:
            self.add(path, log=False)

    def take(self, batch: dict | None) -> dict | None:
        """Pop and record `batch["skipped"]`; the batch without it, or None when no image of it was readable."""
        if batch is None:
            return None
        for path, reason in batch.pop(SKIPPED_KEY, ()):
            self.add(path, reason)
        return batch if "pixel_values" in batch else None
