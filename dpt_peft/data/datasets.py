"""Data of a training run: datasets, checks, few-shot sampling, augmentation, batching, multitask schedules.

Images are decoded in the collate function, not by `datasets`, so that an unreadable or corrupt image is
skipped with a warning naming it (and counted) instead of stopping a long run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Image, load_dataset
from PIL import Image as PILImage

from ..sources import read_class_names
from .catalog import COOP_DATASETS, MAX_VAL_SHOTS, apply_split, load_coop_dataset, load_split_file, subsample_classes
from .catalog import few_shot_split as coop_few_shot_split
from .images import UNREADABLE_IMAGE_ERRORS, open_rgb

if TYPE_CHECKING:
    from ..training.arguments import TrainArguments

logger = logging.getLogger(__name__)
TOY_PREFIX = "toy-"


def load_image_dataset(name_or_path: str, seed: int = 0, data_root: str | None = None) -> DatasetDict:
    """A CoOp benchmark dataset under `data_root`, a Hub dataset name, a local `imagefolder` directory, or a
    generated toy task such as `"toy-position"`."""
    if name_or_path in COOP_DATASETS:
        if not data_root:
            raise ValueError(
                f"--dataset {name_or_path} is a CoOp benchmark dataset: pass --data_root, the folder that holds "
                f"{COOP_DATASETS[name_or_path].directory}/ as laid out in CoOp's DATASETS.md."
            )
        return load_coop_dataset(name_or_path, data_root)
    if name_or_path.startswith(TOY_PREFIX):
        from ..toy.tasks import toy_dataset

        return toy_dataset(name_or_path[len(TOY_PREFIX) :], seed=seed)
    if os.path.isdir(name_or_path):
        return _load_imagefolder(name_or_path)
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path:  # a Hub id is "name" or "owner/name"
        raise FileNotFoundError(
            f"--dataset {name_or_path!r} does not exist; give an existing image folder (one subfolder per class) or "
            "a Hub dataset name."
        )
    return load_dataset(name_or_path)


def _load_imagefolder(path: str) -> DatasetDict:
    """A local folder with one subfolder per class; a flat or one-class folder gets an error saying so."""
    dataset = load_dataset("imagefolder", data_dir=path)
    first = next(iter(dataset.values()))
    label = first.features.get("label")
    if not isinstance(label, ClassLabel) or len(label.names) < 2:
        found = f"only the class {label.names[0]!r}" if isinstance(label, ClassLabel) else "no class subfolders"
        raise ValueError(
            f"--dataset {path} is an image folder with {found}; classification needs one subfolder per class and at "
            f"least two of them ({path}/cat/1.jpg, {path}/dog/2.jpg, ...)."
        )
    return dataset


def load_checked_split(
    name_or_path: str,
    split: str,
    image_column: str,
    label_column: str,
    class_names_file: str | None,
    seed: int = 0,
    split_flag: str = "--split",
    data_root: str | None = None,
    subsample: str = "all",
) -> tuple[DatasetDict, Dataset, list[str]]:
    """A dataset's split with its columns, class names and labels checked; also returns the whole dataset.
    `subsample` "base" or "new" keeps CoCoOp's half of the classes (`catalog.subsample_classes`)."""
    dataset = load_image_dataset(name_or_path, seed=seed, data_root=data_root)
    if subsample != "all":
        if label_column != "label" or not isinstance(next(iter(dataset.values())).features.get("label"), ClassLabel):
            raise ValueError("--subsample_classes needs a ClassLabel column named 'label' (--label_column label).")
        dataset = subsample_classes(dataset, subsample)
    if split not in dataset:
        raise ValueError(f"The dataset has no split {split!r}; its splits are {list(dataset)} ({split_flag}).")
    chosen = dataset[split]
    check_columns(chosen, image_column, label_column)
    class_names = class_names_of(chosen, label_column, class_names_file)
    check_labels(chosen, label_column, class_names)
    return dataset, chosen, class_names


def check_columns(dataset: Dataset, image_column: str, label_column: str) -> None:
    for flag, column in (("--image_column", image_column), ("--label_column", label_column)):
        if column not in dataset.column_names:
            raise ValueError(
                f"The dataset has no column {column!r}; its columns are {dataset.column_names}. Pass the right "
                f"name with {flag}."
            )


def class_names_of(dataset: Dataset, label_column: str, class_names_file: str | None = None) -> list[str]:
    """Class names from a file (one per line) or from the label column's `ClassLabel` feature."""
    if class_names_file:
        return read_class_names(class_names_file)
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    raise ValueError(
        f"Column {label_column!r} is not a ClassLabel, so it names no classes; pass --class_names_file with one "
        "class name per line."
    )


def check_labels(dataset: Dataset, label_column: str, class_names: list[str]) -> None:
    labels = np.asarray(dataset[label_column])
    bad = labels[(labels < 0) | (labels >= len(class_names))]
    if bad.size:
        raise ValueError(
            f"Label {int(bad[0])} in column {label_column!r} is outside the {len(class_names)} class names "
            f"(0..{len(class_names) - 1}); fix the labels or the class names."
        )


def few_shot_split(
    dataset: Dataset, label_column: str, class_names: list[str], shots: int, seed: int, image_column: str = "image"
) -> tuple[Dataset, Dataset]:
    """`shots` readable images per class (seeded) for training, and every other image untouched."""
    labels = np.asarray(dataset[label_column])
    rng = np.random.default_rng(seed)
    chosen = []
    for label, name in enumerate(class_names):
        members = np.flatnonzero(labels == label)
        if len(members) < shots:
            raise ValueError(
                f"Class {name!r} has {len(members)} images, fewer than --shots {shots}; lower --shots or add images."
            )
        chosen.extend(rng.choice(members, size=shots, replace=False).tolist())
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
                raise ValueError(
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


def undecoded(dataset: Dataset, image_column: str) -> Dataset:
    """Keep images as bytes/paths; `ImageBatcher` decodes them and skips the ones that fail."""
    if isinstance(dataset.features[image_column], Image):
        return dataset.cast_column(image_column, Image(decode=False))
    return dataset


def random_resized_crop(
    image: PILImage.Image, size: int, rng: np.random.Generator, min_scale: float = 0.08
) -> PILImage.Image:
    """Inception-style crop (area `min_scale`-1, ratio 3/4-4/3) resized to `size`, as in CoOp/DPT training."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w, h = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
            return image.resize((size, size), PILImage.BICUBIC, box=(left, top, left + w, top + h))
    side = min(width, height)
    box = ((width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2)
    return image.resize((size, size), PILImage.BICUBIC, box=box)


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

    @property
    def crop_size(self) -> int:
        crop = getattr(self.processor, "crop_size", None) or {}
        return int(crop.get("height") or self.processor.size.get("shortest_edge"))

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
                rng = np.random.default_rng([self.seed, self.epoch, int(row["__index__"])])
                image = random_resized_crop(image, self.crop_size, rng, self.min_crop_scale)
                if rng.random() < 0.5:
                    image = image.transpose(PILImage.FLIP_LEFT_RIGHT)
            images.append(image)
            labels.append(row[self.label_column])
        if not images:
            return None
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        # `return_loss` lets a plain transformers Trainer report eval_loss: it inspects CLIPModel.forward (a PEFT
        # model hides ours) and so finds no `labels` argument; DPTPeftModel.forward ignores the flag.
        return {"pixel_values": pixel_values, "labels": torch.tensor(labels, dtype=torch.long), "return_loss": True}

    def _skip(self, value, err: Exception) -> None:
        """Log and count an unreadable image once, however many epochs meet it."""
        where = str(value.get("path") if isinstance(value, dict) else value)
        if where not in self.skipped:
            self.skipped.append(where)
            logger.warning("Skipping unreadable image %s (%s: %s)", where, type(err).__name__, err)


def decode_image_value(value) -> PILImage.Image:
    """A `datasets` image value (PIL image, or `{"bytes", "path"}` when not decoded) as 8-bit RGB."""
    if isinstance(value, PILImage.Image):
        return open_rgb(value)
    return open_rgb(value["bytes"] if value.get("bytes") else value["path"])


def with_index(dataset: Dataset) -> Dataset:
    """Add `__index__` so augmentation can be seeded per sample."""
    return dataset.add_column("__index__", list(range(len(dataset))))


@dataclass
class FewShotData:
    """One task of a run: its few-shot training set, its held-out set and its class names; for a benchmark
    dataset also the few-shot validation set and what its split file is written from."""

    train: Dataset
    test: Dataset
    class_names: list[str]
    val: Dataset | None = None
    split_source: DatasetDict | None = None  # the whole benchmark dataset the split indices point into
    split_indices: dict[str, list[int]] | None = None


def load_task(args: TrainArguments, name: str) -> FewShotData:
    """One task's dataset, class names and few-shot split, with every check a user could fail."""
    if name in COOP_DATASETS:
        return load_benchmark_task(args, name)
    if args.split_file:
        raise ValueError(
            f"--split_file applies to the CoOp benchmark datasets ({', '.join(COOP_DATASETS)}), not {name!r}."
        )
    dataset, pool, class_names = load_checked_split(
        name,
        args.train_split,
        args.image_column,
        args.label_column,
        args.class_names_file,
        args.seed,
        split_flag="--train_split",
        subsample=args.subsample_classes,
    )
    train, rest = few_shot_split(pool, args.label_column, class_names, args.shots, args.seed, args.image_column)
    val = None
    if args.eval_every:  # a few-shot validation set as CoOp's (min(K, 4) per class), never from the test images
        val_shots = min(args.shots, MAX_VAL_SHOTS)
        val, rest = few_shot_split(rest, args.label_column, class_names, val_shots, args.seed + 1, args.image_column)
        val = undecoded(val, args.image_column)
    test = dataset[args.test_split] if args.test_split and args.test_split in dataset else rest
    check_columns(test, args.image_column, args.label_column)
    check_labels(test, args.label_column, class_names)
    train = with_index(undecoded(train, args.image_column))
    return FewShotData(train, undecoded(test, args.image_column), class_names, val=val)


def load_benchmark_task(args: TrainArguments, name: str) -> FewShotData:
    """A CoOp benchmark dataset read from --data_root, its few-shot split (drawn, or reused from --split_file), then
    CoCoOp's base/new class subset: the same images as CoOp for the same seed."""
    dataset = load_coop_dataset(name, args.data_root)
    if args.split_file:
        indices = load_split_file(args.split_file, dataset)
    else:
        indices = coop_few_shot_split(dataset, args.shots, args.seed)
        train = dataset["train"]
        names = train.features["label"].names
        indices["train"] = replace_unreadable_shots(train, indices["train"], "label", "image", names, args.seed)
    chosen = subsample_classes(apply_split(dataset, indices), args.subsample_classes)
    class_names = list(chosen["test"].features["label"].names)
    val = chosen["val"] if "val" in indices else None
    return FewShotData(
        with_index(undecoded(chosen["train"], "image")),
        undecoded(chosen["test"], "image"),
        class_names,
        val=None if val is None else undecoded(val, "image"),
        split_source=dataset,
        split_indices=indices,
    )


def load_tasks(args: TrainArguments) -> dict[str, FewShotData]:
    """Every task of the run, keyed by its dataset name."""
    names = args.datasets
    if len(set(names)) != len(names):
        raise ValueError(f"--tasks lists a dataset twice: {names}; give each task once.")
    return {name: load_task(args, name) for name in names}


def task_schedule(loaders: dict, sampling: str, generator: torch.Generator) -> list[str]:
    """The task of every step of one epoch: each task's batch count (proportional, shuffled), or a uniform draw."""
    names = list(loaders)
    total = sum(len(loader) for loader in loaders.values())
    if sampling == "uniform":
        return [names[i] for i in torch.randint(len(names), (total,), generator=generator).tolist()]
    order = [name for name in names for _ in range(len(loaders[name]))]
    return [order[i] for i in torch.randperm(total, generator=generator).tolist()]


def scheduled_batches(loaders: dict, schedule: list[str]) -> Iterator[tuple[str, dict | None]]:
    """(task, batch) pairs following `schedule`; a task's loader restarts when it runs out."""
    iterators = {name: iter(loader) for name, loader in loaders.items()}
    for name in schedule:
        try:
            batch = next(iterators[name])
        except StopIteration:
            iterators[name] = iter(loaders[name])
            batch = next(iterators[name])
        yield name, batch
