"""Reading a CoOp benchmark dataset from the on-disk layout of CoOp's DATASETS.md, as CoOp's `datasets/*.py` read it
(paths, class names and label order), into a `datasets.DatasetDict`.

Labels are indices, so a class list may name two classes alike (CLIP's ImageNet list names "missile" and
"sunglasses" twice) and CoOp prompts both with the same text. A `ClassLabel` refuses repeated names, so it holds
the names told apart ("missile (2)"), while `prompt_class_names` gives the names as the dataset lists them, for the
prompts. Only what is really ambiguous is refused: one name for two labels where images are labelled by name
(FGVC-Aircraft's variants.txt), or one wnid listed twice in classnames.txt.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, Image

from ..utils.errors import MissingInputError, UserInputError
from ..utils.write_policy import atomic_write_bytes, read_json
from .cache_dir import default_cache_dir
from .catalog import CLASSNAMES_FILE, CoopDatasetSpec, dataset_spec

# One split as read from disk: (absolute image paths, labels).
SplitRows = tuple[list[str], list[int]]
LISTING_FORMAT = 1  # bump when what a cached folder listing holds changes


def load_coop_dataset(name: str, data_root: str | os.PathLike, skip_missing_images: bool = False) -> DatasetDict:
    """A CoOp benchmark dataset read from `<data_root>/<spec.directory>` exactly as CoOp's loader reads it.

    Splits are "train", "val" and "test", or only "test" for the test-only ImageNet variants (imagenetv2,
    imagenet_sketch, imagenet_a, imagenet_r). Features are {"image": Image() holding absolute paths, "label":
    ClassLabel(names=class names in CoOp's label order)}. ImageNet has no separate validation set in CoOp: its
    `images/val/` is the test set and also serves as "val" (CoOp passes `val=test`), so "val" and "test" hold the same
    rows. ImageNet-A and -R keep only their 200 classes, labelled 0..199 in sorted folder (wnid) order as in CoOp.

    Every listed image must exist, as CoOp asserts: a missing one fails here, before any training, with the complete
    list. With `skip_missing_images` they are dropped instead, and `missing_images(split)` counts them.
    """
    spec = dataset_spec(name)
    dataset_dir = os.path.join(os.path.abspath(os.path.expanduser(os.fspath(data_root))), spec.directory)
    _check_layout(spec, dataset_dir)
    class_names, splits = _READERS[spec.reader](spec, dataset_dir)
    listed_by_file = spec.reader in ("split_file", "fgvc_aircraft")  # folder readers list only what exists
    missing = {
        split: [path for path in paths if listed_by_file and not os.path.isfile(path)]
        for split, (paths, _) in splits.items()
    }
    listed = sorted({path for paths in missing.values() for path in paths})
    if listed and not skip_missing_images:
        raise MissingInputError(
            f"{len(listed)} image(s) listed by the {name} dataset under {dataset_dir} do not exist (CoOp asserts "
            "that every listed image exists; re-download the dataset as in CoOp's DATASETS.md, or pass "
            "--skip_missing_images to leave them out and count them):\n" + "\n".join(listed)
        )
    features = Features({"image": Image(), "label": ClassLabel(names=label_names(class_names))})
    dataset = {}
    for split, (paths, labels) in splits.items():
        absent = set(missing[split])
        kept = [(path, label) for path, label in zip(paths, labels) if path not in absent]
        description = json.dumps({"class_names": class_names, "missing_images": len(paths) - len(kept)})
        info = DatasetInfo(dataset_name=name, features=features, description=description)
        columns = {"image": [path for path, _ in kept], "label": [label for _, label in kept]}
        dataset[split] = Dataset.from_dict(columns, info=info, split=split)
    return DatasetDict(dataset)


def _recorded(info: DatasetInfo) -> dict:
    """What `load_coop_dataset` records in a split's info (empty for other datasets, whose description is text)."""
    try:
        recorded = json.loads(info.description or "{}")
    except json.JSONDecodeError:
        return {}
    return recorded if isinstance(recorded, dict) else {}


def prompt_class_names(split: Dataset, label_column: str = "label") -> list[str]:
    """The class names to prompt with, in label order: as the CoOp dataset lists them (repeats included), else the
    `ClassLabel`'s names. `subsample_classes` keeps the recorded list in step with the labels it keeps."""
    shown = list(split.features[label_column].names)
    recorded = _recorded(split.info).get("class_names")
    return list(recorded) if isinstance(recorded, list) and len(recorded) == len(shown) else shown


def missing_images(split: Dataset) -> int:
    """How many images the dataset lists for this split but `load_coop_dataset(skip_missing_images=True)` left out."""
    return int(_recorded(split.info).get("missing_images", 0))


def with_prompt_class_names(info: DatasetInfo, class_names: list[str]) -> DatasetInfo:
    """`info` recording `class_names` (a subset of the classes, relabelled from 0) as the names to prompt with, when
    it holds a CoOp dataset's record (other datasets take their names from the ClassLabel)."""
    recorded = _recorded(info)
    if recorded:
        info.description = json.dumps({**recorded, "class_names": class_names})
    return info


def label_names(class_names: list[str]) -> list[str]:
    """Distinct names for a `ClassLabel`, which refuses repeats: the second "missile" is "missile (2)"."""
    counts: dict[str, int] = {}
    distinct = []
    for name in class_names:
        counts[name] = counts.get(name, 0) + 1
        distinct.append(name if counts[name] == 1 else f"{name} ({counts[name]})")
    if len(set(distinct)) != len(distinct):
        raise UserInputError(
            f"The class names {sorted(n for n in distinct if distinct.count(n) > 1)[:5]} cannot be told apart: a "
            "repeated name's second copy collides with a class already named like it."
        )
    return distinct


def _check_layout(spec: CoopDatasetSpec, dataset_dir: str) -> None:
    """Fail before reading anything, naming the first missing path and the whole layout CoOp expects."""
    expected = [os.path.join(dataset_dir, path) for path in spec.layout]
    described = ", ".join(expected[:-1]) + " and " + expected[-1]
    for entry, path in (("/", dataset_dir + os.sep), *zip(spec.layout, expected)):
        if not (os.path.isdir(path) if entry.endswith("/") else os.path.isfile(path)):
            raise MissingInputError(
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
    content = read_json(split_path, f"CoOp's split file of {spec.name}", "download it again (CoOp's DATASETS.md).")
    rows = {split: content.get(split) if isinstance(content, dict) else None for split in spec.splits}
    for split, split_rows in rows.items():
        if not isinstance(split_rows, list) or not all(map(_is_split_row, split_rows)):
            raise UserInputError(
                f"{split_path}: {split!r} must be a list of [image path, label, class name] rows, as CoOp writes them."
            )
    names_by_label: dict[int, str] = {}
    for _, label, class_name in rows["train"]:
        if names_by_label.setdefault(label, class_name) != class_name:
            raise UserInputError(
                f"{split_path}: label {label} is named both {names_by_label[label]!r} and {class_name!r}."
            )
    if sorted(names_by_label) != list(range(len(names_by_label))):
        raise UserInputError(f"{split_path}: the train labels are not 0..{len(names_by_label) - 1}.")
    for split, split_rows in rows.items():
        for path, label, class_name in split_rows:
            if names_by_label.get(label) != class_name:
                raise UserInputError(
                    f"{split_path}: {split} row {path!r} has label {label} named {class_name!r}, which does not match "
                    "the train rows."
                )
    class_names = [names_by_label[label] for label in range(len(names_by_label))]
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
    class_names = _read_lines(variants_path)
    repeated = sorted({name for name in class_names if class_names.count(name) > 1})
    if repeated:  # images are labelled by variant name here, so a repeated name maps its images to two labels
        raise UserInputError(f"{variants_path} lists the variants {repeated[:5]} twice; each must be listed once.")
    label_of = {class_name: label for label, class_name in enumerate(class_names)}
    splits: dict[str, SplitRows] = {}
    for split in spec.splits:
        list_path = os.path.join(dataset_dir, f"images_variant_{split}.txt")
        paths, labels = [], []
        for line in _read_lines(list_path):
            image_id, _, variant = line.partition(" ")
            if variant not in label_of:
                raise UserInputError(f"{list_path}: variant {variant!r} of image {image_id} is not in {variants_path}.")
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
        raise UserInputError(
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
    class_names = list(_read_classnames(classnames_path).values())
    image_dir = os.path.join(dataset_dir, spec.image_dir)
    folders = [str(label) for label in range(len(class_names))]
    for folder in folders:
        if not os.path.isdir(os.path.join(image_dir, folder)):
            raise MissingInputError(
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
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserInputError(
            f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} on line {line}); save it as UTF-8, as "
            "CoOp's files are."
        ) from err
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # universal newlines, as open() reads
    return [line.strip() for line in lines if line.strip()]


def _read_classnames(path: str) -> dict[str, str]:
    """ImageNet's classnames.txt, lines "n01440764 tench": wnid -> class name, in file order."""
    names_by_wnid: dict[str, str] = {}
    for line in _read_lines(path):
        wnid, _, class_name = line.partition(" ")
        if names_by_wnid.setdefault(wnid, class_name) != class_name or not class_name:
            raise UserInputError(f"{path} names the class folder {wnid} twice or not at all; give one line per wnid.")
    return names_by_wnid


def _class_folders(path: str) -> list[str]:
    """Sorted non-hidden subfolders: CoOp's label order (files such as ImageNet-A's README.txt are not classes)."""
    folders = sorted(entry.name for entry in os.scandir(path) if entry.is_dir() and not entry.name.startswith("."))
    if not folders:
        raise MissingInputError(f"{path} has no class folders; CoOp expects one <wnid>/ folder of images per class.")
    return folders


def _names_of(folders: list[str], names_by_wnid: dict[str, str], classnames_path: str) -> list[str]:
    missing = [folder for folder in folders if folder not in names_by_wnid]
    if missing:
        raise UserInputError(f"Class folders {missing[:5]} are not listed in {classnames_path}.")
    return [names_by_wnid[folder] for folder in folders]


def _read_folders(root: str, folders: list[str]) -> SplitRows:
    """The non-hidden files of each folder, labelled by the folder's position; sorted (CoOp lists them unsorted).

    ImageNet's 1.28M files take long to list and every run of a grid reads them, so the listing is cached under
    `listings/` in the cache root, keyed by the folders' state: adding, removing or renaming a file changes its
    folder's mtime, and so the key.
    """
    state = [root, *((folder, os.stat(os.path.join(root, folder)).st_mtime_ns) for folder in folders)]
    key = hashlib.sha256(json.dumps([LISTING_FORMAT, state]).encode()).hexdigest()
    cache_file = default_cache_dir() / "listings" / f"{key}.json"
    try:
        files_by_folder = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        files_by_folder = [_list_files(os.path.join(root, folder)) for folder in folders]
        _write_quietly(cache_file, json.dumps(files_by_folder))
    paths, labels = [], []
    for label, (folder, names) in enumerate(zip(folders, files_by_folder)):
        paths.extend(os.path.join(root, folder, image_name) for image_name in names)
        labels.extend([label] * len(names))
    return paths, labels


def _list_files(folder_path: str) -> list[str]:
    return sorted(
        entry.name for entry in os.scandir(folder_path) if not entry.name.startswith(".") and not entry.is_dir()
    )


def _write_quietly(path: Path, text: str) -> None:
    """Write atomically; a cache that cannot be written (read-only home) only costs the next run a listing."""
    try:
        atomic_write_bytes(path, text.encode("utf-8"), durable=False)
    except OSError:
        pass
