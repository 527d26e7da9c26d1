"""CoOp's 15 benchmark datasets, read from the on-disk layout of CoOp's DATASETS.md into `datasets.DatasetDict`s.

DPT, CoOp, CoCoOp and MaPLe report results on these datasets with CoOp's fixed splits, so numbers are only comparable
when the very same files are read the same way: the same class names in the same label order, ImageNet's val set
used as its test set, few-shot sets drawn as Dassl draws them, and the same base/new class halves. Every path and
rule here follows CoOp's `datasets/*.py` (and Dassl's `DatasetBase`) rather than its documentation wherever the two
differ.

Images are never opened while loading: the "image" column holds absolute file paths that `datasets` decodes lazily,
and an unreadable image is left to the training pipeline (which skips it). CoOp's `Datum` instead checks that every
image exists while loading.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, Image

logger = logging.getLogger(__name__)

Reader = Literal["split_file", "fgvc_aircraft", "imagenet", "imagenetv2", "wnid_folders"]
Subsample = Literal["all", "base", "new"]
# One split as read from disk: (absolute image paths, labels).
SplitRows = tuple[list[str], list[int]]

CLASSNAMES_FILE = "classnames.txt"
SPLIT_FILE_FORMAT = "dpt_peft/coop-few-shot-split/1"
MAX_VAL_SHOTS = 4  # CoOp: the few-shot val set has min(shots, 4) images per class


@dataclass(frozen=True)
class CoopDatasetSpec:
    """Where CoOp expects one dataset under the data root, how its loader reads it, and its zero-shot prompt."""

    name: str  # stem of CoOp's configs/datasets/<name>.yaml
    coop_name: str  # CoOp's DATASET.NAME: its loader class and the key of its zero-shot CUSTOM_TEMPLATES
    directory: str  # the dataset's folder under data_root
    image_dir: str  # under `directory`: what the annotation files' image paths are relative to ("" = `directory`)
    layout: tuple[str, ...]  # what CoOp's loader reads under `directory` (folders end with "/"), checked up front
    reader: Reader
    template: str  # the single zero-shot prompt CoOp's ZeroshotCLIP uses for this dataset
    split_file: str | None = None  # CoOp's fixed train/val/test split (JSON) under `directory`, if it has one
    visual_warmup_epochs: int | None = None  # ImageNet-like datasets warm up the visual prompts for one epoch

    @property
    def splits(self) -> tuple[str, ...]:
        """The ImageNet variants are test-only: CoOp evaluates on them models trained on ImageNet."""
        return ("test",) if self.reader in ("imagenetv2", "wnid_folders") else ("train", "val", "test")


def _split_file_spec(name: str, coop_name: str, directory: str, image_dir: str, template: str) -> CoopDatasetSpec:
    """The common case: images under one folder plus CoOp's `split_zhou_<coop_name>.json`."""
    split_file = f"split_zhou_{coop_name}.json"
    return CoopDatasetSpec(
        name, coop_name, directory, image_dir, (f"{image_dir}/", split_file), "split_file", template, split_file
    )


def _imagenet_variant_spec(
    name: str, coop_name: str, directory: str, image_dir: str, reader: Reader
) -> CoopDatasetSpec:
    """A test-only ImageNet variant: CoOp reads it with a copy of ImageNet's classnames.txt beside it."""
    layout = (f"{image_dir}/", CLASSNAMES_FILE)
    return CoopDatasetSpec(name, coop_name, directory, image_dir, layout, reader, "a photo of a {}.")


_SPECS = (
    _split_file_spec("caltech101", "Caltech101", "caltech-101", "101_ObjectCategories", "a photo of a {}."),
    _split_file_spec("dtd", "DescribableTextures", "dtd", "images", "{} texture."),
    _split_file_spec("eurosat", "EuroSAT", "eurosat", "2750", "a centered satellite photo of {}."),
    CoopDatasetSpec(
        "fgvc_aircraft",
        "FGVCAircraft",
        "fgvc_aircraft",
        "images",
        ("images/", "variants.txt", *(f"images_variant_{split}.txt" for split in ("train", "val", "test"))),
        "fgvc_aircraft",
        "a photo of a {}, a type of aircraft.",
    ),
    _split_file_spec("food101", "Food101", "food-101", "images", "a photo of {}, a type of food."),
    CoopDatasetSpec(
        "imagenet",
        "ImageNet",
        "imagenet",
        "images",
        ("images/train/", "images/val/", CLASSNAMES_FILE),
        "imagenet",
        "a photo of a {}.",
        visual_warmup_epochs=1,
    ),
    _imagenet_variant_spec("imagenet_a", "ImageNetA", "imagenet-adversarial", "imagenet-a", "wnid_folders"),
    _imagenet_variant_spec("imagenet_r", "ImageNetR", "imagenet-rendition", "imagenet-r", "wnid_folders"),
    _imagenet_variant_spec("imagenet_sketch", "ImageNetSketch", "imagenet-sketch", "images", "wnid_folders"),
    _imagenet_variant_spec(
        "imagenetv2", "ImageNetV2", "imagenetv2", "imagenetv2-matched-frequency-format-val", "imagenetv2"
    ),
    _split_file_spec("oxford_flowers", "OxfordFlowers", "oxford_flowers", "jpg", "a photo of a {}, a type of flower."),
    _split_file_spec("oxford_pets", "OxfordPets", "oxford_pets", "images", "a photo of a {}, a type of pet."),
    # CoOp's StanfordCars split rows are relative to the dataset folder ("cars_train/00001.jpg", "cars_test/...").
    CoopDatasetSpec(
        "stanford_cars",
        "StanfordCars",
        "stanford_cars",
        image_dir="",
        layout=("cars_train/", "cars_test/", "split_zhou_StanfordCars.json"),
        reader="split_file",
        template="a photo of a {}.",
        split_file="split_zhou_StanfordCars.json",
    ),
    _split_file_spec("sun397", "SUN397", "sun397", "SUN397", "a photo of a {}."),
    _split_file_spec("ucf101", "UCF101", "ucf101", "UCF-101-midframes", "a photo of a person doing {}."),
)
COOP_DATASETS: dict[str, CoopDatasetSpec] = {spec.name: spec for spec in _SPECS}
DATASET_NAMES: tuple[str, ...] = tuple(COOP_DATASETS)


def dataset_spec(name: str) -> CoopDatasetSpec:
    """The spec of a CoOp dataset by its config stem, with the valid names in the error when it is unknown."""
    if name not in COOP_DATASETS:
        raise ValueError(f"Unknown CoOp dataset {name!r}; the valid names are: {', '.join(DATASET_NAMES)}.")
    return COOP_DATASETS[name]


def load_coop_dataset(name: str, data_root: str | os.PathLike) -> DatasetDict:
    """A CoOp benchmark dataset read from `<data_root>/<spec.directory>` exactly as CoOp's loader reads it.

    Splits are "train", "val" and "test", or only "test" for the test-only ImageNet variants (imagenetv2,
    imagenet_sketch, imagenet_a, imagenet_r). Features are {"image": Image() holding absolute paths, "label":
    ClassLabel(names=class names in CoOp's label order)}. ImageNet has no separate validation set in CoOp: its
    `images/val/` is the test set and also serves as "val" (CoOp passes `val=test`), so "val" and "test" hold the same
    rows. ImageNet-A and -R keep only their 200 classes, labelled 0..199 in sorted folder (wnid) order as in CoOp.
    """
    spec = dataset_spec(name)
    dataset_dir = os.path.join(os.path.abspath(os.path.expanduser(os.fspath(data_root))), spec.directory)
    _check_layout(spec, dataset_dir)
    class_names, splits = _READERS[spec.reader](spec, dataset_dir)
    features = Features({"image": Image(), "label": ClassLabel(names=class_names)})
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {"image": paths, "label": labels}, info=DatasetInfo(dataset_name=name, features=features), split=split
            )
            for split, (paths, labels) in splits.items()
        }
    )


def _check_layout(spec: CoopDatasetSpec, dataset_dir: str) -> None:
    """Fail before reading anything, naming the first missing path and the whole layout CoOp expects."""
    expected = [os.path.join(dataset_dir, path) for path in spec.layout]
    described = ", ".join(expected[:-1]) + " and " + expected[-1]
    for entry, path in (("/", dataset_dir + os.sep), *zip(spec.layout, expected)):
        if not (os.path.isdir(path) if entry.endswith("/") else os.path.isfile(path)):
            raise FileNotFoundError(
                f"{path} does not exist: the {spec.name} dataset expects {described}, as in CoOp's DATASETS.md."
            )


def _read_split_file(spec: CoopDatasetSpec, dataset_dir: str) -> tuple[list[str], dict[str, SplitRows]]:
    """CoOp's `OxfordPets.read_split`: rows [image path relative to the image dir, label, class name] per split.

    CoOp takes the class names from the train rows (Dassl's `get_lab2cname`); any renaming CoOp does (EuroSAT's and
    Caltech101's NEW_CNAMES, SUN397's and StanfordCars' word reordering, UCF101's underscores) was applied when the
    split file was written, so the names in the file are used as they are.
    """
    split_path = os.path.join(dataset_dir, str(spec.split_file))
    image_dir = os.path.join(dataset_dir, spec.image_dir)
    content = _read_json(split_path)
    rows = {split: content.get(split) if isinstance(content, dict) else None for split in spec.splits}
    for split, split_rows in rows.items():
        if not isinstance(split_rows, list) or not all(map(_is_split_row, split_rows)):
            raise ValueError(
                f"{split_path}: {split!r} must be a list of [image path, label, class name] rows, as CoOp writes them."
            )
    names_by_label: dict[int, str] = {}
    for _, label, class_name in rows["train"]:
        if names_by_label.setdefault(label, class_name) != class_name:
            raise ValueError(f"{split_path}: label {label} is named both {names_by_label[label]!r} and {class_name!r}.")
    if sorted(names_by_label) != list(range(len(names_by_label))):
        raise ValueError(f"{split_path}: the train labels are not 0..{len(names_by_label) - 1}.")
    for split, split_rows in rows.items():
        for path, label, class_name in split_rows:
            if names_by_label.get(label) != class_name:
                raise ValueError(
                    f"{split_path}: {split} row {path!r} has label {label} named {class_name!r}, which does not match "
                    "the train rows."
                )
    class_names = _unique([names_by_label[label] for label in range(len(names_by_label))], split_path)
    return class_names, {
        split: ([os.path.join(image_dir, path) for path, _, _ in split_rows], [label for _, label, _ in split_rows])
        for split, split_rows in rows.items()
    }


def _is_split_row(row: object) -> bool:
    return (
        isinstance(row, list)
        and len(row) == 3
        and isinstance(row[0], str)
        and type(row[1]) is int
        and isinstance(row[2], str)
    )


def _read_fgvc_aircraft(spec: CoopDatasetSpec, dataset_dir: str) -> tuple[list[str], dict[str, SplitRows]]:
    """CoOp reads FGVC-Aircraft's own files, not a split JSON: classes are the lines of variants.txt, in order, and
    each line "<image id> <variant>" of images_variant_<split>.txt is images/<image id>.jpg."""
    variants_path = os.path.join(dataset_dir, "variants.txt")
    class_names = _unique(_read_lines(variants_path), variants_path)
    label_of = {class_name: label for label, class_name in enumerate(class_names)}
    splits: dict[str, SplitRows] = {}
    for split in spec.splits:
        list_path = os.path.join(dataset_dir, f"images_variant_{split}.txt")
        paths, labels = [], []
        for line in _read_lines(list_path):
            image_id, _, variant = line.partition(" ")
            if variant not in label_of:
                raise ValueError(f"{list_path}: variant {variant!r} of image {image_id} is not in {variants_path}.")
            paths.append(os.path.join(dataset_dir, spec.image_dir, f"{image_id}.jpg"))
            labels.append(label_of[variant])
        splits[split] = (paths, labels)
    return class_names, splits


def _read_imagenet(spec: CoopDatasetSpec, dataset_dir: str) -> tuple[list[str], dict[str, SplitRows]]:
    """CoOp's ImageNet: images/train/<wnid>/ and images/val/<wnid>/, labels in sorted wnid order, and val as test.

    CoOp needs the val images sorted into one folder per wnid like train (the official archive is flat), and it
    labels each folder by its position, so both folders must hold the same classes.
    """
    classnames_path = os.path.join(dataset_dir, CLASSNAMES_FILE)
    names_by_wnid = _read_classnames(classnames_path)
    train_dir, val_dir = (os.path.join(dataset_dir, spec.image_dir, split) for split in ("train", "val"))
    folders = _class_folders(train_dir)
    if _class_folders(val_dir) != folders:
        raise ValueError(
            f"{val_dir} and {train_dir} must hold the same <wnid> class folders: CoOp labels each by its sorted "
            "position."
        )
    test = _read_folders(val_dir, folders)
    return _names_of(folders, names_by_wnid, classnames_path), {
        "train": _read_folders(train_dir, folders),
        "val": test,
        "test": test,
    }


def _read_imagenetv2(spec: CoopDatasetSpec, dataset_dir: str) -> tuple[list[str], dict[str, SplitRows]]:
    """CoOp's ImageNetV2: folder <label index>/ holds the images of the classnames.txt line at that index."""
    classnames_path = os.path.join(dataset_dir, CLASSNAMES_FILE)
    class_names = _unique(list(_read_classnames(classnames_path).values()), classnames_path)
    image_dir = os.path.join(dataset_dir, spec.image_dir)
    folders = [str(label) for label in range(len(class_names))]
    for folder in folders:
        if not os.path.isdir(os.path.join(image_dir, folder)):
            raise FileNotFoundError(
                f"{os.path.join(image_dir, folder)} does not exist: CoOp reads ImageNetV2 as one folder per label "
                f"0..{len(folders) - 1} under {image_dir}."
            )
    return class_names, {"test": _read_folders(image_dir, folders)}


def _read_wnid_folders(spec: CoopDatasetSpec, dataset_dir: str) -> tuple[list[str], dict[str, SplitRows]]:
    """CoOp's ImageNet-Sketch, -A and -R: one folder per wnid present (200 for -A and -R), labelled in sorted order."""
    classnames_path = os.path.join(dataset_dir, CLASSNAMES_FILE)
    image_dir = os.path.join(dataset_dir, spec.image_dir)
    folders = _class_folders(image_dir)
    class_names = _names_of(folders, _read_classnames(classnames_path), classnames_path)
    return class_names, {"test": _read_folders(image_dir, folders)}


_READERS = {
    "split_file": _read_split_file,
    "fgvc_aircraft": _read_fgvc_aircraft,
    "imagenet": _read_imagenet,
    "imagenetv2": _read_imagenetv2,
    "wnid_folders": _read_wnid_folders,
}


def _read_lines(path: str) -> list[str]:
    """Stripped non-blank lines (CoOp strips each line; a stray blank line would otherwise become a class)."""
    with open(path, encoding="utf-8") as file:
        return [line.strip() for line in file if line.strip()]


def _read_classnames(path: str) -> dict[str, str]:
    """ImageNet's classnames.txt, lines "n01440764 tench": wnid -> class name, in file order."""
    names_by_wnid = {}
    for line in _read_lines(path):
        wnid, _, class_name = line.partition(" ")
        names_by_wnid[wnid] = class_name
    return names_by_wnid


def _read_json(path: str) -> object:
    with open(path, encoding="utf-8") as file:
        try:
            return json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error


def _class_folders(path: str) -> list[str]:
    """Sorted non-hidden subfolders: CoOp's label order (files such as ImageNet-A's README.txt are not classes)."""
    folders = sorted(entry.name for entry in os.scandir(path) if entry.is_dir() and not entry.name.startswith("."))
    if not folders:
        raise FileNotFoundError(f"{path} has no class folders; CoOp expects one <wnid>/ folder of images per class.")
    return folders


def _names_of(folders: list[str], names_by_wnid: dict[str, str], classnames_path: str) -> list[str]:
    missing = [folder for folder in folders if folder not in names_by_wnid]
    if missing:
        raise ValueError(f"Class folders {missing[:5]} are not listed in {classnames_path}.")
    return _unique([names_by_wnid[folder] for folder in folders], classnames_path)


def _unique(class_names: list[str], source: str) -> list[str]:
    """Fail naming the file: a ClassLabel refuses repeated names with a message that does not say where from."""
    repeated = sorted(name for name, count in Counter(class_names).items() if count > 1)
    if repeated:
        raise ValueError(f"{source} gives more than one class the names {repeated[:5]}; class names must be unique.")
    return class_names


def _read_folders(root: str, folders: list[str]) -> SplitRows:
    """The non-hidden files of each folder, labelled by the folder's position; sorted (CoOp lists them unsorted)."""
    paths, labels = [], []
    for label, folder in enumerate(folders):
        folder_path = os.path.join(root, folder)
        names = sorted(
            entry.name for entry in os.scandir(folder_path) if not entry.name.startswith(".") and not entry.is_dir()
        )
        paths.extend(os.path.join(folder_path, image_name) for image_name in names)
        labels.extend([label] * len(names))
    return paths, labels


def few_shot_split(dataset_dict: DatasetDict, shots: int, seed: int) -> dict[str, list[int]]:
    """Row indices of a CoOp few-shot set: `shots` images per class from "train", min(shots, 4) from "val".

    Follows Dassl's `generate_fewshot_dataset` (called by CoOp with repeat=False): classes in order of first
    appearance, `random.sample` of each class's images in dataset order, train drawn before val from one generator
    seeded with `seed`, as CoOp's `random.seed(cfg.SEED)` leaves it. A class with fewer images than needed is NOT an
    error there: all its images are kept (a warning names the class). When "val" holds the test images (ImageNet,
    whose val is its test set) CoOp leaves it whole, and so does this: only "train" is returned then. "test" is never
    subsampled.
    """
    if shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}; use the whole dataset instead of a few-shot split.")
    if "train" not in dataset_dict:
        raise ValueError(f"A few-shot split needs a 'train' split; this dataset only has {list(dataset_dict)}.")
    rng = random.Random(seed)
    indices = {"train": _sample_per_class(dataset_dict["train"], shots, rng)}
    if "val" in dataset_dict and not _is_test_set(dataset_dict, "val"):
        indices["val"] = _sample_per_class(dataset_dict["val"], min(shots, MAX_VAL_SHOTS), rng)
    return indices


def _sample_per_class(dataset: Dataset, shots: int, rng: random.Random) -> list[int]:
    rows_by_label: dict[int, list[int]] = {}
    for row, label in enumerate(_labels(dataset)):
        rows_by_label.setdefault(label, []).append(row)
    chosen = []
    for label, rows in rows_by_label.items():
        if len(rows) < shots:
            logger.warning(
                "Class %r of the %s split has %d images, fewer than %d shots: keeping all of them (as Dassl does).",
                dataset.features["label"].int2str(label),
                dataset.split,
                len(rows),
                shots,
            )
            chosen.extend(rows)
        else:
            chosen.extend(rng.sample(rows, shots))
    return chosen


def _is_test_set(dataset_dict: DatasetDict, split: str) -> bool:
    """Whether a split holds exactly the test images, as CoOp's ImageNet "val" does."""
    if "test" not in dataset_dict or len(dataset_dict[split]) != len(dataset_dict["test"]):
        return False
    return dataset_dict[split].with_format("arrow")["image"].equals(dataset_dict["test"].with_format("arrow")["image"])


def _labels(dataset: Dataset) -> list[int]:
    return dataset.with_format("arrow")["label"].to_pylist()


def _image_paths(dataset: Dataset) -> list[str | None]:
    return dataset.with_format("arrow")["image"].combine_chunks().field("path").to_pylist()


def apply_split(dataset_dict: DatasetDict, indices: dict[str, list[int]]) -> DatasetDict:
    """The rows `indices` names of each split it names (in that order); other splits, such as "test", untouched."""
    unknown = sorted(set(indices) - set(dataset_dict))
    if unknown:
        raise ValueError(f"The split names {unknown} are not in this dataset, whose splits are {list(dataset_dict)}.")
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
        raise ValueError(f"provenance names dataset {provenance['dataset']!r} but the splits are from {name!r}.")
    spec = dataset_spec(name)
    chosen = apply_split(dataset_dict, indices)
    splits = {}
    for split in indices:
        relative = [_relative_path(image_path, spec) for image_path in _image_paths(chosen[split])]
        splits[split] = [[image_path, label] for image_path, label in zip(relative, _labels(chosen[split]))]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        json.dump({"format": SPLIT_FILE_FORMAT, "provenance": provenance, "splits": splits}, file, indent=1)


def load_split_file(path: str | os.PathLike, dataset_dict: DatasetDict) -> dict[str, list[int]]:
    """The row indices, in this copy of the dataset, of the images a `save_split_file` file lists.

    Fails naming the file when it is not such a file, was made from another dataset, lists an image this copy lacks,
    or gives an image another label (a different split file or class order).
    """
    content = _read_json(os.fspath(path))
    if not (
        isinstance(content, dict)
        and content.get("format") == SPLIT_FILE_FORMAT
        and isinstance(content.get("provenance"), dict)
        and isinstance(content.get("splits"), dict)
    ):
        raise ValueError(f"{path} is not a few-shot split file written by save_split_file ({SPLIT_FILE_FORMAT}).")
    name = _coop_name(dataset_dict)
    if content["provenance"].get("dataset") != name:
        raise ValueError(f"{path} is a split of {content['provenance'].get('dataset')!r}, not of {name!r}.")
    spec = dataset_spec(name)
    indices = {}
    for split, rows in content["splits"].items():
        if split not in dataset_dict:
            raise ValueError(f"{path} lists a {split!r} split, which the {name} dataset does not have.")
        if not isinstance(rows, list) or not all(
            isinstance(row, list) and len(row) == 2 and isinstance(row[0], str) and type(row[1]) is int for row in rows
        ):
            raise ValueError(f"{path}: {split!r} must be a list of [image path, label] rows.")
        dataset = dataset_dict[split]
        row_of: dict[str, int] = {}
        for row, image_path in enumerate(_image_paths(dataset)):
            row_of.setdefault(_relative_path(image_path, spec), row)
        labels = _labels(dataset)
        indices[split] = []
        for image_path, label in rows:
            if image_path not in row_of:
                raise ValueError(f"{path} lists {split} image {image_path!r}, which is not in this {name} dataset.")
            row = row_of[image_path]
            if labels[row] != label:
                raise ValueError(
                    f"{path} gives {split} image {image_path!r} label {label}, but this {name} dataset gives it "
                    f"{labels[row]}."
                )
            indices[split].append(row)
    return indices


def _coop_name(dataset_dict: DatasetDict) -> str:
    """The CoOp name `load_coop_dataset` records in each split's info (needed to place paths in the dataset folder)."""
    names = {dataset.info.dataset_name for dataset in dataset_dict.values()}
    if len(names) != 1 or not names <= set(COOP_DATASETS):
        raise ValueError(
            f"Expected a DatasetDict from load_coop_dataset; its splits are from {sorted(map(str, names))}."
        )
    return names.pop()


def _relative_path(image_path: str | None, spec: CoopDatasetSpec) -> str:
    """An image's path relative to its dataset folder: what follows the last `<directory>/<image dir>/` in it."""
    marker = os.sep + os.path.join(spec.directory, spec.image_dir).rstrip(os.sep) + os.sep
    if image_path is not None and (start := image_path.rfind(marker)) >= 0:
        return image_path[start + len(os.sep) + len(spec.directory) + len(os.sep) :].replace(os.sep, "/")
    raise ValueError(f"Image {image_path!r} is not inside a {marker!r} folder of the {spec.name} dataset.")


def subsample_classes(dataset_dict: DatasetDict, which: Subsample) -> DatasetDict:
    """CoCoOp's base-to-new split of every split: the first ceil(n/2) labels are "base", the rest "new".

    "new" classes are relabelled from 0 and each ClassLabel keeps only the chosen names; "all" returns the dataset
    unchanged. n is the ClassLabel's size; CoOp counts the labels present in train, the same for its 11 datasets.
    """
    if which not in ("all", "base", "new"):
        raise ValueError(f"which must be 'all', 'base' or 'new', got {which!r}.")
    if which == "all":
        return dataset_dict
    names = {tuple(dataset.features["label"].names) for dataset in dataset_dict.values()}
    if len(names) != 1:
        raise ValueError("The splits have different class names; subsample_classes needs one ClassLabel for all.")
    class_names = list(names.pop())
    half = math.ceil(len(class_names) / 2)
    first, stop = (0, half) if which == "base" else (half, len(class_names))
    return DatasetDict(
        {split: _keep_labels(dataset, first, stop, class_names[first:stop]) for split, dataset in dataset_dict.items()}
    )


def _keep_labels(dataset: Dataset, first: int, stop: int, class_names: list[str]) -> Dataset:
    """The rows with labels first..stop-1, relabelled from 0, with the same info and a ClassLabel of `class_names`."""
    labels = _labels(dataset)
    rows = [row for row, label in enumerate(labels) if first <= label < stop]
    table = dataset.select(rows).with_format("arrow")[:]
    features = dataset.features.copy()
    features["label"] = ClassLabel(names=class_names)
    info = dataset.info.copy()
    info.features = features
    columns = {column: table[column] for column in table.column_names}
    columns["label"] = [labels[row] - first for row in rows]
    return Dataset.from_dict(columns, info=info, split=dataset.split)
