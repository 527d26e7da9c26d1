"""The tasks of a run: datasets (CoOp benchmark, Hub, imagefolder, toy) with their columns, class names and labels
checked, and each task's few-shot training, validation and test sets."""

from __future__ import annotations

import logging
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from PIL import Image as PILImage

from ..utils.errors import MissingInputError, UserInputError
from ..utils.seeding import seed_for
from .batching import undecoded, with_index
from .catalog import COOP_DATASETS, MAX_VAL_SHOTS
from .coop_readers import load_coop_dataset, prompt_class_names
from .coop_splits import apply_split, coop_few_shot_split, load_split_file, subsample_classes
from .few_shot import draw_shots, replace_unreadable_shots
from .spec import DataSpec

logger = logging.getLogger(__name__)
TOY_PREFIX = "toy-"


def load_image_dataset(name_or_path: str, seed: int = 0, data_root: str | None = None) -> DatasetDict:
    """A CoOp benchmark dataset under `data_root`, a Hub dataset name, a local `imagefolder` directory, or a
    generated toy task such as `"toy-position"`."""
    if name_or_path in COOP_DATASETS:
        if not data_root:
            raise UserInputError(
                f"--dataset {name_or_path} is a CoOp benchmark dataset: pass --data_root, the folder that holds "
                f"{COOP_DATASETS[name_or_path].directory}/ as laid out in CoOp's DATASETS.md."
            )
        return load_coop_dataset(name_or_path, data_root)
    if name_or_path.startswith(TOY_PREFIX):
        from ..toy.tasks import ATTRIBUTES, toy_dataset

        attribute = name_or_path[len(TOY_PREFIX) :]
        if attribute not in ATTRIBUTES:
            raise UserInputError(
                f"--dataset {name_or_path} is not a toy task; choose one of "
                f"{', '.join(TOY_PREFIX + name for name in sorted(ATTRIBUTES))}."
            )
        return toy_dataset(attribute, seed=seed)
    if os.path.isdir(name_or_path):
        return _load_imagefolder(name_or_path)
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path:  # a Hub id is "name" or "owner/name"
        raise MissingInputError(
            f"--dataset {name_or_path!r} does not exist; give an existing image folder (one subfolder per class) or "
            "a Hub dataset name."
        )
    return load_dataset(name_or_path)


def _load_imagefolder(path: str) -> DatasetDict:
    """A local folder with one subfolder per class; a flat or one-class folder, or a name that is not UTF-8, gets an
    error saying so."""
    _check_names_are_utf8(path)
    try:
        dataset = load_dataset("imagefolder", data_dir=path)
    except FileNotFoundError as err:  # datasets' "doesn't contain any data files"
        raise UserInputError(
            f"--dataset {path} holds no image files; give a folder with one subfolder of images per class "
            f"({path}/cat/1.jpg, {path}/dog/2.jpg, ...)."
        ) from err
    first = next(iter(dataset.values()))
    label = first.features.get("label")
    if not isinstance(label, ClassLabel) or len(label.names) < 2:
        found = f"only the class {label.names[0]!r}" if isinstance(label, ClassLabel) else "no class subfolders"
        raise UserInputError(
            f"--dataset {path} is an image folder with {found}; classification needs one subfolder per class and at "
            f"least two of them ({path}/cat/1.jpg, {path}/dog/2.jpg, ...)."
        )
    for folder in _empty_class_folders(path, set(label.names)):  # imagefolder drops them: the class would vanish
        logger.warning(
            "--dataset %s: the class folder %s holds no images, so that class is left out of the label space; add "
            "images to it or remove the folder.",
            path,
            folder,
        )
    return dataset


def _check_names_are_utf8(path: str) -> None:
    """Every file and folder name under `path` is UTF-8 (`datasets` fails on others with a long traceback; a class
    named by such a folder could not be written to the adapter's config either)."""
    for root, folders, files in os.walk(path):
        for name in (*folders, *files):
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:  # undecodable bytes, kept by os.fsdecode as surrogates
                shown = os.fsencode(os.path.join(root, name)).decode("utf-8", "backslashreplace")
                raise UserInputError(
                    f"--dataset {path}: the name {shown} is not valid UTF-8; rename it (e.g. `convmv -f latin1 -t "
                    "utf8 -r --notest <folder>`), so that every class and image has a name that can be written."
                ) from None


def _empty_class_folders(path: str, class_names: set[str]) -> list[str]:
    """Folders beside the class folders (at the level that holds them) without an image file anywhere below."""
    suffixes = {suffix.lower() for suffix in PILImage.registered_extensions()}
    empty = []
    for root, folders, _ in os.walk(path):
        if class_names & set(folders):
            for name in sorted(set(folders) - class_names):
                below = (f for _, _, files in os.walk(os.path.join(root, name)) for f in files)
                if not any(os.path.splitext(f)[1].lower() in suffixes for f in below):
                    empty.append(os.path.join(root, name))
    return empty


def load_checked_split(
    name_or_path: str | DatasetDict,
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
    given = isinstance(name_or_path, DatasetDict)  # a DatasetDict given in Python (`TrainArguments(dataset=...)`)
    dataset = name_or_path if given else load_image_dataset(name_or_path, seed=seed, data_root=data_root)
    if subsample != "all":
        if label_column != "label" or not isinstance(next(iter(dataset.values())).features.get("label"), ClassLabel):
            raise UserInputError("--subsample_classes needs a ClassLabel column named 'label' (--label_column label).")
        dataset = subsample_classes(dataset, subsample)
    if split not in dataset:
        raise UserInputError(f"The dataset has no split {split!r}; its splits are {list(dataset)} ({split_flag}).")
    chosen = dataset[split]
    check_columns(chosen, image_column, label_column)
    class_names = class_names_of(chosen, label_column, class_names_file)
    check_labels(chosen, label_column, class_names)
    return dataset, chosen, class_names


def check_columns(dataset: Dataset, image_column: str, label_column: str) -> None:
    for flag, column in (("--image_column", image_column), ("--label_column", label_column)):
        if column not in dataset.column_names:
            raise UserInputError(
                f"The dataset has no column {column!r}; its columns are {dataset.column_names}. Pass the right "
                f"name with {flag}."
            )


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names from a UTF-8 text file, one per line (blank lines ignored, `\n` or `\r\n` ends a line); a missing,
    binary or empty file, or a name with a control character (an escape, BEL, NUL, a lone `\r` that would split it),
    is refused naming the file and line, before any model or data loads."""
    where = f"--class_names_file {os.fspath(path)}"
    fix = "give a UTF-8 text file with one class name per line."
    try:
        data = Path(path).read_bytes()
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserInputError(f"{where} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); {fix}") from err
    except OSError as err:
        reason = "is a folder, not a file" if isinstance(err, IsADirectoryError) else f"cannot be read ({err.strerror})"
        raise UserInputError(f"{where} {reason}; {fix}") from err
    names = []
    for number, line in enumerate(text.split("\n"), start=1):
        name = line.strip()
        control = next((c for c in name if unicodedata.category(c) == "Cc"), None)
        if control is not None:
            raise UserInputError(
                f"{where}, line {number}: the class name {name!r} holds the control character {control!r}; {fix}"
            )
        if name:
            names.append(name)
    if not names:
        raise UserInputError(f"{where} holds no class names; {fix}")
    return names


def class_names_of(dataset: Dataset, label_column: str, class_names_file: str | None = None) -> list[str]:
    """Class names from a file (one per line) or from the label column's `ClassLabel` feature."""
    if class_names_file:
        return read_class_names(class_names_file)
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):  # a CoOp dataset's own list, repeats included ("missile" twice in ImageNet)
        return prompt_class_names(dataset, label_column)
    raise UserInputError(
        f"Column {label_column!r} is not a ClassLabel, so it names no classes; pass --class_names_file with one "
        "class name per line."
    )


def check_labels(dataset: Dataset, label_column: str, class_names: list[str]) -> None:
    labels = np.asarray(dataset[label_column])
    bad = labels[(labels < 0) | (labels >= len(class_names))]
    if bad.size:
        raise UserInputError(
            f"Label {int(bad[0])} in column {label_column!r} is outside the {len(class_names)} class names "
            f"(0..{len(class_names) - 1}); fix the labels or the class names."
        )


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


def load_task(spec: DataSpec, name: str) -> FewShotData:
    """One task's dataset, class names and few-shot split, with every check a user could fail."""
    if name in COOP_DATASETS:
        return load_benchmark_task(spec, name)
    if spec.split_file:
        raise UserInputError(
            f"--split_file applies to the CoOp benchmark datasets ({', '.join(COOP_DATASETS)}), not {name!r}."
        )
    dataset, pool, class_names = load_checked_split(
        spec.given.get(name, name),
        spec.train_split,
        spec.image_column,
        spec.label_column,
        spec.class_names_file,
        spec.seed,
        split_flag="--train_split",
        subsample=spec.subsample_classes,
    )
    train, rest = draw_shots(pool, spec.label_column, class_names, spec.shots, spec.seed, spec.image_column)
    val = None
    if spec.eval_every:  # a few-shot validation set as CoOp's (min(K, 4) per class), never from the test images
        val_shots = min(spec.shots, MAX_VAL_SHOTS)
        val_seed = seed_for(spec.seed, "validation_shots")
        val, rest = draw_shots(rest, spec.label_column, class_names, val_shots, val_seed, spec.image_column)
        val = undecoded(val, spec.image_column)
    test = dataset[spec.test_split] if spec.test_split and spec.test_split in dataset else rest
    check_columns(test, spec.image_column, spec.label_column)
    check_labels(test, spec.label_column, class_names)
    train = with_index(undecoded(train, spec.image_column))
    return FewShotData(train, undecoded(test, spec.image_column), class_names, val=val)


def load_benchmark_task(spec: DataSpec, name: str) -> FewShotData:
    """A CoOp benchmark dataset read from --data_root, its few-shot split (drawn, or reused from --split_file), then
    CoCoOp's base/new class subset: the same images as CoOp for the same seed."""
    dataset = load_coop_dataset(name, spec.data_root, spec.skip_missing_images)
    if spec.split_file:
        indices = load_split_file(spec.split_file, dataset, spec.shots)
    else:
        indices = coop_few_shot_split(dataset, spec.shots, spec.seed)  # CoOp's draw with CoOp's seed: CoOp's images
        train = dataset["train"]
        names = train.features["label"].names
        indices["train"] = replace_unreadable_shots(train, indices["train"], "label", "image", names, spec.seed)
    chosen = subsample_classes(apply_split(dataset, indices), spec.subsample_classes)
    class_names = prompt_class_names(chosen["test"])
    val = chosen["val"] if "val" in indices else None
    return FewShotData(
        with_index(undecoded(chosen["train"], "image")),
        undecoded(chosen["test"], "image"),
        class_names,
        val=None if val is None else undecoded(val, "image"),
        split_source=dataset,
        split_indices=indices,
    )


def load_tasks(spec: DataSpec) -> dict[str, FewShotData]:
    """Every task of the run, keyed by its dataset name."""
    names = list(spec.datasets)
    if len(set(names)) != len(names):
        raise UserInputError(f"--tasks lists a dataset twice: {names}; give each task once.")
    return {name: load_task(spec, name) for name in names}
