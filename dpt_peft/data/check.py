"""`check_data`: is a data root ready for the benchmark? Every dataset's layout, split file, class list and listed
images, checked without opening an image, each problem said with where CoOp's DATASETS.md gets the missing piece.

Every benchmark grid runs it before its first run, so a missing `ucf101/` fails in seconds rather than after hours
of ImageNet training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..utils.errors import MissingInputError
from .batching import undecoded
from .catalog import dataset_spec
from .coop_readers import load_coop_dataset, missing_images

DATASETS_MD = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
# DATASETS.md's section of each dataset (its anchors), by catalog name.
_SECTIONS = {
    "caltech101": "caltech101",
    "dtd": "dtd",
    "eurosat": "eurosat",
    "fgvc_aircraft": "fgvcaircraft",
    "food101": "food101",
    "imagenet": "imagenet",
    "imagenet_a": "imagenet-a",
    "imagenet_r": "imagenet-r",
    "imagenet_sketch": "imagenet-sketch",
    "imagenetv2": "imagenetv2",
    "oxford_flowers": "flowers102",
    "oxford_pets": "oxfordpets",
    "stanford_cars": "stanfordcars",
    "sun397": "sun397",
    "ucf101": "ucf101",
}
# Class counts DATASETS.md states ("contains 1,000 folders", "200 folders").
_STATED_CLASSES = {"imagenet": 1000, "imagenet_sketch": 1000, "imagenet_a": 200, "imagenet_r": 200}


@dataclass
class DatasetCheck:
    """What was found for one dataset: images per split, classes, and each problem (empty when ready)."""

    name: str
    images: dict[str, int] = field(default_factory=dict)
    missing_images: dict[str, int] = field(default_factory=dict)
    num_classes: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing, but a run can go ahead (a subset of classes)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line when ready, else the problems, each on its own line."""
        notes = [f"  note: {note}" for note in self.notes]
        if self.ok:
            counts = ", ".join(f"{split} {count}" for split, count in self.images.items())
            return "\n".join([f"{self.name}: ok ({self.num_classes} classes; {counts} images)", *notes])
        return "\n".join([f"{self.name}: NOT READY", *(f"  - {problem}" for problem in self.problems), *notes])


def instructions_for(name: str) -> str:
    """Where CoOp's DATASETS.md says how to get a dataset."""
    return f"{DATASETS_MD}#{_SECTIONS[name]}"


def check_dataset(name: str, data_root: str | os.PathLike, skip_missing_images: bool = False) -> DatasetCheck:
    """Read one dataset as a run would, and say what is missing. Listed images that do not exist are a problem
    unless `skip_missing_images` (then they are only counted, as the runs will skip them)."""
    check = DatasetCheck(name)
    get_it = f"see {instructions_for(name)}"
    try:
        dataset = load_coop_dataset(name, data_root, skip_missing_images=True)
    except (OSError, ValueError) as error:
        check.problems.append(f"{error} ({get_it})")
        return check
    check.num_classes = len(next(iter(dataset.values())).features["label"].names)
    folder = os.path.join(os.path.abspath(os.path.expanduser(os.fspath(data_root))), dataset_spec(name).directory)
    for split, rows in dataset.items():
        check.images[split] = len(rows)
        check.missing_images[split] = missing_images(rows)
        if not len(rows):
            check.problems.append(f"its {split} split holds no image ({get_it}).")
        outside = [path for path in _image_paths(rows) if not _inside(path, folder)]
        if outside:
            check.problems.append(
                f"its {split} split lists {len(outside)} image(s) outside {folder}, such as {outside[0]}: a split "
                f"file lists paths below the dataset's image folder, never absolute or with `..` ({get_it})."
            )
    missing = sum(check.missing_images.values())
    if missing and not skip_missing_images:
        try:
            load_coop_dataset(name, data_root)
        except FileNotFoundError as error:  # the complete list of missing files
            check.problems.append(f"{error}\n({get_it})")
    stated = _STATED_CLASSES.get(name)
    if stated is not None and check.num_classes != stated:
        check.notes.append(
            f"{check.num_classes} class folders found where DATASETS.md states {stated}: a subset of the classes "
            f"is scored, so the numbers are not the papers' ({get_it})."
        )
    return check


def _image_paths(rows) -> list[str]:
    return [value["path"] for value in undecoded(rows, "image")["image"]]


def _inside(path: str, folder: str) -> bool:
    """Whether `path` lies below `folder`, as written (a symbolic link to elsewhere, e.g. a dataset on another disk,
    is fine; `..` and absolute paths in a split file are not)."""
    return os.path.normpath(path).startswith(os.path.normpath(folder) + os.sep)


def check_data(
    data_root: str | os.PathLike, datasets: list[str] | tuple[str, ...], skip_missing_images: bool = False
) -> list[DatasetCheck]:
    """Check every dataset in `datasets` under `data_root` (unknown names fail at once, listing the valid ones)."""
    for name in datasets:
        dataset_spec(name)
    return [check_dataset(name, data_root, skip_missing_images) for name in datasets]


def require_data(
    data_root: str | os.PathLike, datasets: list[str] | tuple[str, ...], skip_missing_images: bool = False
) -> list[DatasetCheck]:
    """`check_data`, failing with every problem of every dataset at once when one is not ready."""
    checks = check_data(data_root, datasets, skip_missing_images)
    not_ready = [check for check in checks if not check.ok]
    if not_ready:
        raise MissingInputError(
            f"The data under {os.fspath(data_root)} is not ready for this benchmark "
            f"({len(not_ready)} of {len(checks)} datasets); nothing was run:\n"
            + "\n".join(check.summary() for check in not_ready)
        )
    return checks
