"""Synthetic mini copies of CoOp's 15 dataset layouts (paths written out from CoOp's `datasets/*.py`).

Used by the catalog's tests and by the CLIs' tests that read benchmark datasets end to end.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from PIL import Image as PILImage

COUNTS = {"train": 3, "val": 2, "test": 2}
# The dataset folder and the folder CoOp's split file (or folder listing) is relative to, from CoOp's loaders.
DIRECTORIES = {
    "caltech101": ("caltech-101", "101_ObjectCategories"),
    "dtd": ("dtd", "images"),
    "eurosat": ("eurosat", "2750"),
    "fgvc_aircraft": ("fgvc_aircraft", "images"),
    "food101": ("food-101", "images"),
    "imagenet": ("imagenet", "images"),
    "imagenet_a": ("imagenet-adversarial", "imagenet-a"),
    "imagenet_r": ("imagenet-rendition", "imagenet-r"),
    "imagenet_sketch": ("imagenet-sketch", "images"),
    "imagenetv2": ("imagenetv2", "imagenetv2-matched-frequency-format-val"),
    "oxford_flowers": ("oxford_flowers", "jpg"),
    "oxford_pets": ("oxford_pets", "images"),
    "stanford_cars": ("stanford_cars", ""),
    "sun397": ("sun397", "SUN397"),
    "ucf101": ("ucf101", "UCF-101-midframes"),
}
SPLIT_FILES = {
    "caltech101": "split_zhou_Caltech101.json",
    "dtd": "split_zhou_DescribableTextures.json",
    "eurosat": "split_zhou_EuroSAT.json",
    "food101": "split_zhou_Food101.json",
    "oxford_flowers": "split_zhou_OxfordFlowers.json",
    "oxford_pets": "split_zhou_OxfordPets.json",
    "stanford_cars": "split_zhou_StanfordCars.json",
    "sun397": "split_zhou_SUN397.json",
    "ucf101": "split_zhou_UCF101.json",
}
# (folder, class name as CoOp's split file holds it): renamings such as Caltech101's "Faces" -> "face" and
# EuroSAT's "AnnualCrop" -> "Annual Crop Land" were made when the split file was written.
SPLIT_FILE_CLASSES = {
    "caltech101": [("accordion", "accordion"), ("Faces", "face"), ("Leopards", "leopard")],
    "dtd": [("banded", "banded"), ("blotchy", "blotchy")],
    "eurosat": [("AnnualCrop", "Annual Crop Land"), ("SeaLake", "Sea or Lake"), ("Forest", "Forest")],
    "food101": [("apple_pie", "apple_pie"), ("baby_back_ribs", "baby_back_ribs")],
    "oxford_flowers": [("1", "pink primrose"), ("2", "hard-leaved pocket orchid"), ("3", "canterbury bells")],
    "oxford_pets": [("Abyssinian", "abyssinian"), ("american_bulldog", "american_bulldog")],
    "stanford_cars": [("1", "2012 AM General Hummer SUV"), ("2", "2012 Acura RL Sedan")],
    "sun397": [("a/abbey", "abbey"), ("o/office_building/outdoor", "outdoor office_building")],
    "ucf101": [("Apply_Eye_Makeup", "Apply_Eye_Makeup"), ("Archery", "Archery")],
}
PETS = [(breed, breed.lower()) for breed in ("Abyssinian", "Bengal", "Birman", "Bombay", "Sphynx")]
AIRCRAFT = ["707-320", "Cessna 172", "A300B4"]
WNIDS = [
    ("n01440764", "tench"),
    ("n01443537", "goldfish"),
    ("n01484850", "great white shark"),
    ("n01491361", "tiger shark"),
    ("n01494475", "hammerhead shark"),
]
# ImageNet-A and -R hold a subset of the classes; created out of order to check that labels follow sorted wnids.
VARIANT_WNIDS = [WNIDS[4], WNIDS[1], WNIDS[3]]


def image_bytes(suffix: str) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (8, 8), (200, 30, 60)).save(buffer, format="PNG" if suffix == ".png" else "JPEG")
    return buffer.getvalue()


IMAGE_BYTES = {suffix: image_bytes(suffix) for suffix in (".jpg", ".png")}


def write_image(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(IMAGE_BYTES[".png" if path.suffix == ".png" else ".jpg"])
    return str(path)


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def split_row_path(name: str, split: str, folder: str, i: int) -> str:
    """A row's image path in the style of each CoOp split file."""
    if name == "oxford_pets":
        return f"{folder}_{split}{i}.jpg"
    if name == "oxford_flowers":
        return f"image_{folder}{split}{i}.jpg"
    if name == "stanford_cars":
        return f"cars_{'test' if split == 'test' else 'train'}/{folder}{split}{i}.jpg"
    return f"{folder}/{split}_{i}.jpg"


def make_layout(root: Path, name: str, counts: dict[str, int] = COUNTS, classes: list | None = None):
    """A mini copy of one CoOp layout under `root`: (class names, {split: [(image path, label)]})."""
    directory, image_dir = DIRECTORIES[name]
    dataset_dir = root / directory
    images = dataset_dir / image_dir
    expected: dict[str, list[tuple[str, int]]] = {}
    if name in SPLIT_FILES:
        classes = classes or SPLIT_FILE_CLASSES[name]
        split = {}
        for split_name, count in counts.items():
            rows = [
                [split_row_path(name, split_name, folder, i), label, class_name]
                for label, (folder, class_name) in enumerate(classes)
                for i in range(count)
            ]
            random.Random(0).shuffle(rows)  # a class's first row decides its few-shot drawing order
            split[split_name] = rows
            expected[split_name] = [(write_image(images / path), label) for path, label, _ in rows]
        (dataset_dir / SPLIT_FILES[name]).write_text(json.dumps(split))
        return [class_name for _, class_name in classes], expected
    if name == "fgvc_aircraft":
        write_lines(dataset_dir / "variants.txt", AIRCRAFT)
        for split_name, count in counts.items():
            lines = []
            expected[split_name] = []
            for label, variant in enumerate(AIRCRAFT):
                for i in range(count):
                    image_id = f"{split_name}{label}{i:05d}"
                    lines.append(f"{image_id} {variant}")
                    expected[split_name].append((write_image(images / f"{image_id}.jpg"), label))
            write_lines(dataset_dir / f"images_variant_{split_name}.txt", lines)
        return AIRCRAFT, expected
    write_lines(dataset_dir / "classnames.txt", [f"{wnid} {class_name}" for wnid, class_name in WNIDS])
    if name == "imagenet":
        wnids = WNIDS[:3]
        for split_name, folder in (("train", "train"), ("test", "val")):
            expected[split_name] = [
                (write_image(images / folder / wnid / f"{wnid}_{i}.JPEG"), label)
                for label, (wnid, _) in enumerate(wnids)
                for i in range(counts[split_name])
            ]
        (images / "train" / wnids[0][0] / ".DS_Store").write_bytes(b"")  # hidden files are not images
        expected["val"] = expected["test"]
        return [class_name for _, class_name in wnids], expected
    if name == "imagenetv2":
        write_lines(dataset_dir / "classnames.txt", [f"{wnid} {class_name}" for wnid, class_name in WNIDS[:3]])
        expected["test"] = [
            (write_image(images / str(label) / f"{i}.png"), label) for label in range(3) for i in range(counts["test"])
        ]
        return [class_name for _, class_name in WNIDS[:3]], expected
    wnids = VARIANT_WNIDS if name in ("imagenet_a", "imagenet_r") else WNIDS[:3]
    (images / "README.txt").parent.mkdir(parents=True, exist_ok=True)
    (images / "README.txt").write_text("not a class")
    for wnid, _ in wnids:
        for i in range(counts["test"]):
            write_image(images / wnid / f"{name}_{i}.png")
    ordered = sorted(wnids)
    expected["test"] = [
        (str(images / wnid / f"{name}_{i}.png"), label)
        for label, (wnid, _) in enumerate(ordered)
        for i in range(counts["test"])
    ]
    return [class_name for _, class_name in ordered], expected


def make_imagenet(root: Path, class_names: list[str], per_class: int = 1) -> list[str]:
    """CoOp's ImageNet layout for a whole class list (wnids n00000000, n00000001, ... in list order, so the sorted
    folder order is the list's): classnames.txt, images/train/<wnid>/ and images/val/<wnid>/. Returns the wnids."""
    wnids = [f"n{index:08d}" for index in range(len(class_names))]
    dataset_dir = root / "imagenet"
    write_lines(dataset_dir / "classnames.txt", [f"{wnid} {name}" for wnid, name in zip(wnids, class_names)])
    for folder in ("train", "val"):
        for wnid in wnids:
            for i in range(per_class):
                write_image(dataset_dir / "images" / folder / wnid / f"{wnid}_{i}.JPEG")
    return wnids
