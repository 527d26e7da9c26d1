"""Few-shot tasks on the shifted shapes domain, as `datasets.DatasetDict`s.

Each task classifies one attribute of the shapes images: `position` (the embedded default), `shape`,
`size` or `colour`. The class names are words the toy CLIP knows, but the generic zero-shot template
"a photo of a {}." fits some of them badly ("a photo of a left."): a learned context can fix the wording,
which is what prompt tuning is for, while the frozen features carry the information.
"""

from __future__ import annotations

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage

from .shapes import COLOURS, POSITIONS, SHAPES, SIZES, render

ATTRIBUTES = {"position": list(POSITIONS), "shape": list(SHAPES), "size": list(SIZES), "colour": list(COLOURS)}
TRAIN_POOL_PER_CLASS = 32
TEST_IMAGES = 600
DOWNSTREAM_SHIFT = 1.0
TEST_SEED = 20_000


def _dataset(attribute: str, seed: int, per_class: int, shift: float) -> Dataset:
    rng = np.random.default_rng(seed)
    names = ATTRIBUTES[attribute]
    labels = np.repeat(np.arange(len(names)), per_class)
    fixed = {"shapes": labels} if attribute == "shape" else {"positions": labels} if attribute == "position" else {}
    batch = render(rng, len(labels), shift=shift, **fixed)
    if attribute in ("size", "colour"):
        labels = batch.sizes if attribute == "size" else batch.colours
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    rows = {"image": [PILImage.fromarray(image) for image in batch.images], "label": np.asarray(labels).tolist()}
    return Dataset.from_dict(rows, features=features)


def toy_dataset(attribute: str = "position", seed: int = 0, shift: float = DOWNSTREAM_SHIFT) -> DatasetDict:
    """`train` is a pool that few-shot sampling draws from (it depends on `seed`); `test` holds 600 other images,
    the same for every seed, as a benchmark's test set is: an adapter is scored on the images it was reported on
    whatever seed its evaluation is given. Both come from the shifted downstream distribution. Every task can be
    split into CoCoOp's base and new halves (`--subsample_classes base`); toy-shape (6 classes) and toy-colour (8)
    have enough classes for both halves to be a real classification task."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"Unknown toy task {attribute!r}; choose one of {sorted(ATTRIBUTES)}.")
    pool = TRAIN_POOL_PER_CLASS * len(ATTRIBUTES[attribute])
    return DatasetDict(
        train=_dataset(attribute, 10_000 + seed, pool // len(ATTRIBUTES[attribute]), shift),
        test=_dataset(attribute, TEST_SEED, TEST_IMAGES // len(ATTRIBUTES[attribute]), shift),
    )
