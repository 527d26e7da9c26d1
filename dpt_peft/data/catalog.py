"""CoOp's 15 benchmark datasets: where each lies under the data root (CoOp's DATASETS.md), how it is read, its
zero-shot prompt.

DPT, CoOp, CoCoOp and MaPLe report results on these datasets with CoOp's fixed splits, so numbers are only comparable
when the very same files are read the same way: the same class names in the same label order, ImageNet's val set
used as its test set, few-shot sets drawn as Dassl draws them, and the same base/new class halves. Every path and
rule here follows CoOp's `datasets/*.py` (and Dassl's `DatasetBase`) rather than its documentation wherever the two
differ.

The readers are in `coop_readers.py`, the few-shot split files and base/new halves in `coop_splits.py`. Images are
never opened while loading: the "image" column holds absolute file paths that `datasets` decodes lazily, and an
unreadable image is left to the training pipeline (which skips and counts it). That every listed image exists is
checked while loading, as CoOp's `Datum` does (`--skip_missing_images` leaves them out and counts them instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..utils.errors import UserInputError

Reader = Literal["split_file", "fgvc_aircraft", "imagenet", "imagenetv2", "wnid_folders"]

CLASSNAMES_FILE = "classnames.txt"
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
        raise UserInputError(f"Unknown CoOp dataset {name!r}; the valid names are: {', '.join(DATASET_NAMES)}.")
    return COOP_DATASETS[name]


# The papers' order (CoOp, CoCoOp, DPT): the 11 few-shot datasets, then ImageNet's variants (domain generalization).
FEW_SHOT_DATASETS = (
    "imagenet",
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
)
DOMAIN_GENERALIZATION_TARGETS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
PAPER_ORDER = (*FEW_SHOT_DATASETS, *DOMAIN_GENERALIZATION_TARGETS)
