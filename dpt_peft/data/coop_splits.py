"""CoOp's few-shot sets (drawn as Dassl draws them) and their JSON split files, and CoCoOp's base/new class halves."""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Literal

from datasets import ClassLabel, Dataset, DatasetDict

from ..utils.errors import UserInputError
from ..utils.write_policy import atomic_write_bytes, read_json
from .catalog import COOP_DATASETS, MAX_VAL_SHOTS, CoopDatasetSpec, dataset_spec
from .coop_readers import prompt_class_names, with_prompt_class_names
from .few_shot import few_shot_split

Subsample = Literal["all", "base", "new"]
SPLIT_FILE_FORMAT = "dpt_peft/coop-few-shot-split/1"


def coop_few_shot_split(dataset_dict: DatasetDict, shots: int, seed: int) -> dict[str, list[int]]:
    """Row indices of a CoOp few-shot set: `shots` images per class from "train", min(shots, 4) from "val".

    Follows Dassl's `generate_fewshot_dataset` (called by CoOp with repeat=False): classes in order of first
    appearance, `random.sample` of each class's images in dataset order, train drawn before val from one generator
    seeded with `seed`, as CoOp's `random.seed(cfg.SEED)` leaves it. A class with fewer images than needed is NOT an
    error there: all its images are kept (a warning names the class). When "val" holds the test images (ImageNet,
    whose val is its test set) CoOp leaves it whole, and so does this: only "train" is returned then. "test" is never
    subsampled.
    """
    if shots < 1:
        raise UserInputError(
            f"shots must be at least 1, got {shots}; use the whole dataset instead of a few-shot split."
        )
    if "train" not in dataset_dict:
        raise UserInputError(f"A few-shot split needs a 'train' split; this dataset only has {list(dataset_dict)}.")
    rng = random.Random(seed)
    indices = {"train": _dassl_draw(dataset_dict["train"], shots, rng)}
    if "val" in dataset_dict and not _is_test_set(dataset_dict, "val"):
        indices["val"] = _dassl_draw(dataset_dict["val"], min(shots, MAX_VAL_SHOTS), rng)
    return indices


def _dassl_draw(dataset: Dataset, shots: int, rng: random.Random) -> list[int]:
    class_names = dataset.features["label"].names
    return few_shot_split(_labels(dataset), shots, rng, class_names, short_classes="keep", split=dataset.split)


def _is_test_set(dataset_dict: DatasetDict, split: str) -> bool:
    """Whether a split holds exactly the test images, as CoOp's ImageNet "val" does."""
    if "test" not in dataset_dict or len(dataset_dict[split]) != len(dataset_dict["test"]):
        return False
    return dataset_dict[split].with_format("arrow")["image"].equals(dataset_dict["test"].with_format("arrow")["image"])


def _labels(dataset: Dataset, label_column: str = "label") -> list[int]:
    return dataset.with_format("arrow")[label_column].to_pylist()


def _image_paths(dataset: Dataset) -> list[str | None]:
    return dataset.with_format("arrow")["image"].combine_chunks().field("path").to_pylist()


def apply_split(dataset_dict: DatasetDict, indices: dict[str, list[int]]) -> DatasetDict:
    """The rows `indices` names of each split it names (in that order); other splits, such as "test", untouched."""
    unknown = sorted(set(indices) - set(dataset_dict))
    if unknown:
        raise UserInputError(
            f"The split names {unknown} are not in this dataset, whose splits are {list(dataset_dict)}."
        )
    return DatasetDict(
        {
            split: dataset.select(indices[split]) if split in indices else dataset
            for split, dataset in dataset_dict.items()
        }
    )


def save_split_file(
    path: str | os.PathLike, dataset_dict: DatasetDict, indices: dict[str, list[int]], **provenance: object
) -> None:
    """Write a few-shot split as JSON (never pickle, unlike CoOp's split_fewshot/*.pkl) that another machine can load.

    Each chosen image is stored as [path relative to the dataset folder with "/" separators, label], so the file does
    not depend on where the data lives. `provenance` (such as shots and seed) is stored with the dataset name.
    """
    name = _coop_name(dataset_dict)
    if provenance.setdefault("dataset", name) != name:
        raise UserInputError(f"provenance names dataset {provenance['dataset']!r} but the splits are from {name!r}.")
    spec = dataset_spec(name)
    chosen = apply_split(dataset_dict, indices)
    splits = {}
    for split in indices:
        relative = [_relative_path(image_path, spec) for image_path in _image_paths(chosen[split])]
        splits[split] = [[image_path, label] for image_path, label in zip(relative, _labels(chosen[split]))]
    content = {"format": SPLIT_FILE_FORMAT, "provenance": provenance, "splits": splits}
    atomic_write_bytes(path, json.dumps(content, indent=1).encode("utf-8"))


def load_split_file(
    path: str | os.PathLike, dataset_dict: DatasetDict, shots: int | None = None
) -> dict[str, list[int]]:
    """The row indices, in this copy of the dataset, of the images a `save_split_file` file lists.

    Fails naming the file when it is not such a file, was made from another dataset, lists an image this copy lacks,
    or gives an image another label (a different split file or class order); also, before anything is written,
    when a list is empty, repeats an image, names a path outside the dataset folder, or (train) leaves a class
    without its `shots` images (fewer only where the class has fewer) or gives it more.
    """
    content = read_json(path, "--split_file", "give a split file train wrote (<output_dir>/splits/<dataset>.json).")
    if not (
        isinstance(content, dict)
        and content.get("format") == SPLIT_FILE_FORMAT
        and isinstance(content.get("provenance"), dict)
        and isinstance(content.get("splits"), dict)
    ):
        raise UserInputError(f"{path} is not a few-shot split file written by save_split_file ({SPLIT_FILE_FORMAT}).")
    name = _coop_name(dataset_dict)
    if content["provenance"].get("dataset") != name:
        raise UserInputError(f"{path} is a split of {content['provenance'].get('dataset')!r}, not of {name!r}.")
    spec = dataset_spec(name)
    indices = {}
    for split, rows in content["splits"].items():
        if split not in dataset_dict:
            raise UserInputError(f"{path} lists a {split!r} split, which the {name} dataset does not have.")
        if not isinstance(rows, list) or not all(
            isinstance(row, list) and len(row) == 2 and isinstance(row[0], str) and type(row[1]) is int for row in rows
        ):
            raise UserInputError(f"{path}: {split!r} must be a list of [image path, label] rows.")
        _check_rows(path, split, rows)
        dataset = dataset_dict[split]
        row_of: dict[str, int] = {}
        for row, image_path in enumerate(_image_paths(dataset)):
            row_of.setdefault(_relative_path(image_path, spec), row)
        labels = _labels(dataset)
        indices[split] = []
        for image_path, label in rows:
            if image_path not in row_of:
                raise UserInputError(f"{path} lists {split} image {image_path!r}, which is not in this {name} dataset.")
            row = row_of[image_path]
            if labels[row] != label:
                raise UserInputError(
                    f"{path} gives {split} image {image_path!r} label {label}, but this {name} dataset gives it "
                    f"{labels[row]}."
                )
            indices[split].append(row)
    if "train" not in indices:
        raise UserInputError(f"{path} has no 'train' list; write it with save_split_file (a run's splits/*.json).")
    _check_shots(path, _labels(dataset_dict["train"]), [label for _, label in content["splits"]["train"]], shots)
    return indices


def _check_rows(path: str | os.PathLike, split: str, rows: list[list]) -> None:
    """A split file's list: not empty, no image twice, every path relative and inside the dataset folder."""
    if not rows:
        raise UserInputError(f"{path}: the {split!r} list is empty; a split file lists at least one image per class.")
    seen: set[str] = set()
    for image_path, _ in rows:
        parts = PurePosixPath(image_path).parts
        if not parts or image_path.startswith(("/", "\\")) or ".." in parts or os.path.isabs(image_path):
            raise UserInputError(
                f"{path}: {split} image {image_path!r} is not a path inside the dataset folder (relative, no '..'); "
                "use a split file written by save_split_file."
            )
        if image_path in seen:
            raise UserInputError(f"{path}: {split} image {image_path!r} is listed twice; each image is listed once.")
        seen.add(image_path)


def _check_shots(path: str | os.PathLike, dataset_labels: list[int], labels: list[int], shots: int | None) -> None:
    """Every class of the dataset has `shots` training images in the file (all it has, when fewer), at least one."""
    available = Counter(dataset_labels)
    listed = Counter(labels)
    for label in sorted(available):
        expected = min(shots, available[label]) if shots else None
        if listed[label] == 0 or (expected is not None and listed[label] != expected):
            wanted = f"--shots {shots}" if shots else "at least one"
            raise UserInputError(
                f"{path}: class {label} has {listed[label]} training images in the file, not {wanted}; use the split "
                "file of a run with these --shots (its splits/*.json), or draw the split again without --split_file."
            )


def _coop_name(dataset_dict: DatasetDict) -> str:
    """The CoOp name `load_coop_dataset` records in each split's info (needed to place paths in the dataset folder)."""
    names = {dataset.info.dataset_name for dataset in dataset_dict.values()}
    if len(names) != 1 or not names <= set(COOP_DATASETS):
        raise UserInputError(
            f"Expected a DatasetDict from load_coop_dataset; its splits are from {sorted(map(str, names))}."
        )
    return names.pop()


def _relative_path(image_path: str | None, spec: CoopDatasetSpec) -> str:
    """An image's path relative to its dataset folder: what follows the last `<directory>/<image dir>/` in it."""
    marker = os.sep + os.path.join(spec.directory, spec.image_dir).rstrip(os.sep) + os.sep
    if image_path is not None and (start := image_path.rfind(marker)) >= 0:
        return image_path[start + len(os.sep) + len(spec.directory) + len(os.sep) :].replace(os.sep, "/")
    raise UserInputError(f"Image {image_path!r} is not inside a {marker!r} folder of the {spec.name} dataset.")


def base_new_labels(
    class_names: Sequence[str], base: Sequence[str] | None = None, new: Sequence[str] | None = None
) -> tuple[list[int], list[int]]:
    """CoCoOp's base/new rule, the one both training (`subsample_classes`) and evaluation use: the labels of the
    first ceil(n/2) classes are "base", the rest "new", unless classes are named (a repeated name, which CLIP's
    ImageNet list has, names all its classes). Naming only one side makes the other the remaining classes."""
    labels = list(range(len(class_names)))
    if base is None and new is None:
        half = math.ceil(len(class_names) / 2)
        return labels[:half], labels[half:]
    unknown = [name for name in [*(base or []), *(new or [])] if name not in class_names]
    if unknown:
        raise UserInputError(f"Class {unknown[0]!r} is not in the dataset's classes {list(class_names)}.")
    if base:
        base_labels = [label for label in labels if class_names[label] in base]
    else:
        base_labels = [label for label in labels if class_names[label] not in (new or [])]
    if new:
        return base_labels, [label for label in labels if class_names[label] in new]
    return base_labels, [label for label in labels if label not in base_labels]


def subsample_classes(dataset_dict: DatasetDict, which: Subsample) -> DatasetDict:
    """CoCoOp's base-to-new split of every split (`base_new_labels`): "base" or "new" keeps that half of the classes,
    relabelled from 0 (`keep_classes`); "all" returns the dataset unchanged. n is the ClassLabel's size; CoOp counts
    the labels present in train, the same for its 11 datasets."""
    if which not in ("all", "base", "new"):
        raise UserInputError(f"which must be 'all', 'base' or 'new', got {which!r}.")
    if which == "all":
        return dataset_dict
    names = {tuple(dataset.features["label"].names) for dataset in dataset_dict.values()}
    if len(names) != 1:
        raise UserInputError("The splits have different class names; subsample_classes needs one ClassLabel for all.")
    base, new = base_new_labels(names.pop())
    kept = base if which == "base" else new
    return DatasetDict({split: keep_classes(dataset, kept) for split, dataset in dataset_dict.items()})


def keep_classes(dataset: Dataset, labels: Sequence[int], label_column: str = "label") -> Dataset:
    """The rows whose label is in `labels`, relabelled to its position there, with the same info and split; a
    ClassLabel keeps only those names, and a CoOp dataset's record its names to prompt with, in step."""
    position = {label: index for index, label in enumerate(labels)}
    rows = [row for row, label in enumerate(_labels(dataset, label_column)) if label in position]
    features = dataset.features.copy()
    label_feature = features[label_column]
    if isinstance(label_feature, ClassLabel):
        features[label_column] = ClassLabel(names=[label_feature.names[label] for label in labels])
    kept = dataset.select(rows).map(
        lambda batch: {label_column: [position[label] for label in batch]},
        input_columns=label_column,
        batched=True,
        features=features,
    )
    if isinstance(label_feature, ClassLabel):
        prompts = prompt_class_names(dataset, label_column)
        with_prompt_class_names(kept.info, [prompts[label] for label in labels])  # the copy `map` made
    return kept
