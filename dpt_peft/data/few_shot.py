"""Few-shot sampling: one draw of `shots` images per class, used by CoOp's protocol (`coop_splits`) and by every
other dataset (`datasets.load_task`), and replacing chosen images that cannot be decoded."""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from datasets import Dataset

from ..utils.errors import UserInputError
from .batching import undecoded
from .file_digests import content_digest
from .images import UNREADABLE_IMAGE_ERRORS, decode_image_value

logger = logging.getLogger(__name__)


def few_shot_split(
    labels: Sequence[int],
    shots: int,
    rng: random.Random | np.random.Generator,
    class_names: Sequence[str],
    *,
    short_classes: Literal["keep", "error"],
    split: str = "train",
) -> list[int]:
    """Row indices of `shots` rows per class.

    The generator decides the draw, so a seed keeps giving the same images: a `random.Random` draws as Dassl's
    `generate_fewshot_dataset` (what CoOp's splits are; classes in order of first appearance, `rng.sample`), a
    NumPy generator visits every class of `class_names` in label order (`rng.choice` without replacement).
    `short_classes`: "keep" keeps every row of a class with fewer than `shots` rows, as Dassl does (with a warning);
    "error" refuses it, naming the class.
    """
    rows_by_label: dict[int, list[int]] = {}
    if isinstance(rng, np.random.Generator):
        rows_by_label = {label: [] for label in range(len(class_names))}
    for row, label in enumerate(labels):
        rows_by_label.setdefault(int(label), []).append(row)
    chosen: list[int] = []
    for label, rows in rows_by_label.items():
        if len(rows) >= shots:
            picked = rng.sample(rows, shots) if isinstance(rng, random.Random) else rng.choice(rows, shots, False)
            chosen.extend(int(row) for row in picked)
        elif short_classes == "error":
            raise UserInputError(
                f"Class {class_names[label]!r} has {len(rows)} images, fewer than --shots {shots}; lower --shots or "
                "add images."
            )
        else:
            logger.warning(
                "Class %r of the %s split has %d images, fewer than %d shots: keeping all of them (as Dassl does).",
                class_names[label],
                split,
                len(rows),
                shots,
            )
            chosen.extend(rows)
    return chosen


def draw_shots(
    dataset: Dataset, label_column: str, class_names: list[str], shots: int, seed: int, image_column: str = "image"
) -> tuple[Dataset, Dataset]:
    """`shots` readable images per class (seeded) for training, and every other image untouched."""
    labels = np.asarray(dataset[label_column])
    chosen = few_shot_split(labels, shots, np.random.default_rng(seed), class_names, short_classes="error")
    chosen = replace_unreadable_shots(dataset, chosen, label_column, image_column, class_names, seed)
    chosen_set = set(chosen)
    rest = [i for i in range(len(dataset)) if i not in chosen_set]
    return dataset.select(sorted(chosen)), dataset.select(rest)


def replace_unreadable_shots(
    dataset: Dataset, chosen: list[int], label_column: str, image_column: str, class_names: list[str], seed: int
) -> list[int]:
    """`chosen` with every image that cannot be decoded replaced by a readable image of its class that was not
    chosen (drawn with a generator seeded by `seed`); an error naming the class when it has too few readable images.

    Each chosen image is decoded once here, so a few-shot set never trains on fewer images than asked for.
    """
    view = undecoded(dataset, image_column)
    labels = np.asarray(dataset[label_column])
    taken = set(chosen)
    spares: dict[int, list[int]] = {}
    result = []
    for index in chosen:
        label = int(labels[index])
        candidate = index
        while not _readable(view[candidate][image_column], candidate):
            if label not in spares:
                others = [int(i) for i in np.flatnonzero(labels == label) if i not in taken]
                spares[label] = np.random.default_rng([seed, label]).permutation(others).tolist()
            if not spares[label]:
                raise UserInputError(
                    f"Class {class_names[label]!r} has too few readable images for the few-shot set (unreadable ones "
                    "are logged above); lower --shots, or fix or add images of that class."
                )
            candidate = spares[label].pop(0)
            taken.add(candidate)
        result.append(candidate)
    return result


def _readable(value, index: int) -> bool:
    try:
        decode_image_value(value)
    except (*UNREADABLE_IMAGE_ERRORS, KeyError) as err:
        where = value.get("path") if isinstance(value, dict) else None
        logger.warning(
            "Few-shot image %s is unreadable (%s: %s); drawing another of its class.",
            where or index,
            type(err).__name__,
            err,
        )
        return False
    return True


def data_fingerprint(tasks: Mapping[str, Any], image_column: str, label_column: str | None = None) -> str:
    """What a run trains on, as one sha256: each task's training images in order (a file by its path below the
    images' common folder and its content's sha256, cached: a byte-identical copy of the data is the same data; an
    embedded image by its bytes) and, given `label_column`, their labels.
    Recorded with the run's arguments, so a resume on changed data (class folders swapped, files replaced, labels
    changed) is refused and a grid does not reuse the run. A content hash of what trains, not the fingerprint `datasets`
    keeps: that one follows the dataset's history, and turns random after a transform it cannot hash, so the same
    data given again could look different."""
    digest = hashlib.sha256()
    for name in sorted(tasks):
        train = undecoded(tasks[name].train, image_column)
        values = train[image_column]
        paths = [v.get("path") for v in values if isinstance(v, dict) and not v.get("bytes") and v.get("path")]
        root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0]) if paths else ""
        digest.update(f"task {name} {len(values)}\n".encode())
        for value in values:
            if isinstance(value, dict) and value.get("bytes"):
                digest.update(hashlib.sha256(value["bytes"]).digest())
            elif isinstance(value, dict) and value.get("path"):
                content = content_digest(value["path"])
                digest.update(f"{os.path.relpath(value['path'], root)} {content}\n".encode())
            else:
                digest.update(repr(value).encode())
        if label_column is not None:
            digest.update(f"labels {list(train[label_column])}\n".encode())
    return digest.hexdigest()
