"""CoOp's 15 dataset layouts read from synthetic mini copies, few-shot split files, and base/new classes.

The mini copies are built from the paths in CoOp's `datasets/*.py` written out here, not from the catalog's own
specs, so a wrong path in the catalog fails these tests.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import pytest
from coop_layouts import DIRECTORIES, PETS, SPLIT_FILES, make_layout
from datasets import Image

from dpt_peft.data.catalog import COOP_DATASETS, DATASET_NAMES
from dpt_peft.data.coop_readers import load_coop_dataset, missing_images
from dpt_peft.data.coop_splits import (
    apply_split,
    base_new_labels,
    coop_few_shot_split,
    keep_classes,
    load_split_file,
    save_split_file,
    subsample_classes,
)


def image_paths(dataset) -> list[str]:
    return [image["path"] for image in dataset.cast_column("image", Image(decode=False))["image"]]


def rows_of(dataset) -> list[tuple[str, int]]:
    return list(zip(image_paths(dataset), dataset["label"]))


def test_the_15_coop_datasets_and_their_zero_shot_templates():
    assert DATASET_NAMES == (
        "caltech101",
        "dtd",
        "eurosat",
        "fgvc_aircraft",
        "food101",
        "imagenet",
        "imagenet_a",
        "imagenet_r",
        "imagenet_sketch",
        "imagenetv2",
        "oxford_flowers",
        "oxford_pets",
        "stanford_cars",
        "sun397",
        "ucf101",
    )
    templates = {name: COOP_DATASETS[name].template for name in DATASET_NAMES}
    assert templates["oxford_pets"] == "a photo of a {}, a type of pet."
    assert templates["oxford_flowers"] == "a photo of a {}, a type of flower."
    assert templates["fgvc_aircraft"] == "a photo of a {}, a type of aircraft."
    assert templates["dtd"] == "{} texture."
    assert templates["eurosat"] == "a centered satellite photo of {}."
    assert templates["food101"] == "a photo of {}, a type of food."
    assert templates["ucf101"] == "a photo of a person doing {}."
    for name in (
        "stanford_cars",
        "sun397",
        "caltech101",
        "imagenet",
        "imagenetv2",
        "imagenet_sketch",
        "imagenet_a",
        "imagenet_r",
    ):
        assert templates[name] == "a photo of a {}."
    warmups = {name: COOP_DATASETS[name].visual_warmup_epochs for name in DATASET_NAMES}
    assert warmups == {name: 1 if name == "imagenet" else None for name in DATASET_NAMES}
    for name, split_file in SPLIT_FILES.items():
        assert COOP_DATASETS[name].split_file == split_file
    for name, (directory, image_dir) in DIRECTORIES.items():
        assert (COOP_DATASETS[name].directory, COOP_DATASETS[name].image_dir) == (directory, image_dir)


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_loads_each_coop_layout(tmp_path, name):
    class_names, expected = make_layout(tmp_path, name)
    dataset = load_coop_dataset(name, tmp_path)
    assert list(dataset) == (
        ["test"] if name in ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r") else ["train", "val", "test"]
    )
    for split, rows in expected.items():
        assert dataset[split].features["label"].names == class_names
        assert len(dataset[split]) == len(rows)
        assert sorted(rows_of(dataset[split])) == sorted(rows)
        assert all(os.path.isabs(path) and os.path.isfile(path) for path in image_paths(dataset[split]))
    assert dataset["test"][0]["image"].size == (8, 8)  # decoded lazily, on access


def test_class_names_and_labels_follow_coop(tmp_path):
    make_layout(tmp_path, "imagenet_a")
    make_layout(tmp_path, "caltech101")
    make_layout(tmp_path, "imagenet")
    imagenet_a = load_coop_dataset("imagenet_a", tmp_path)["test"]
    assert imagenet_a.features["label"].names == ["goldfish", "tiger shark", "hammerhead shark"]
    assert {Path(path).parent.name: label for path, label in rows_of(imagenet_a)} == {
        "n01443537": 0,
        "n01491361": 1,
        "n01494475": 2,
    }
    caltech = load_coop_dataset("caltech101", str(tmp_path))
    assert caltech["train"].features["label"].names == ["accordion", "face", "leopard"]
    imagenet = load_coop_dataset("imagenet", tmp_path)
    assert imagenet["train"].features["label"].names == ["tench", "goldfish", "great white shark"]
    assert image_paths(imagenet["val"]) == image_paths(imagenet["test"])
    assert all(f"{os.sep}val{os.sep}" in path for path in image_paths(imagenet["test"]))


MISSING = [
    ("oxford_pets", "oxford_pets/split_zhou_OxfordPets.json"),
    ("oxford_pets", "oxford_pets/images"),
    ("oxford_flowers", "oxford_flowers/jpg"),
    ("oxford_flowers", "oxford_flowers/split_zhou_OxfordFlowers.json"),
    ("caltech101", "caltech-101/split_zhou_Caltech101.json"),
    ("caltech101", "caltech-101/101_ObjectCategories"),
    ("dtd", "dtd/split_zhou_DescribableTextures.json"),
    ("eurosat", "eurosat/2750"),
    ("food101", "food-101/split_zhou_Food101.json"),
    ("stanford_cars", "stanford_cars/cars_test"),
    ("stanford_cars", "stanford_cars/split_zhou_StanfordCars.json"),
    ("sun397", "sun397"),
    ("ucf101", "ucf101/UCF-101-midframes"),
    ("fgvc_aircraft", "fgvc_aircraft/variants.txt"),
    ("fgvc_aircraft", "fgvc_aircraft/images_variant_val.txt"),
    ("fgvc_aircraft", "fgvc_aircraft/images"),
    ("imagenet", "imagenet/classnames.txt"),
    ("imagenet", "imagenet/images/val"),
    ("imagenet", "imagenet/images/train"),
    ("imagenetv2", "imagenetv2/classnames.txt"),
    ("imagenetv2", "imagenetv2/imagenetv2-matched-frequency-format-val/1"),
    ("imagenet_sketch", "imagenet-sketch/images"),
    ("imagenet_sketch", "imagenet-sketch/classnames.txt"),
    ("imagenet_a", "imagenet-adversarial/imagenet-a"),
    ("imagenet_a", "imagenet-adversarial/classnames.txt"),
    ("imagenet_r", "imagenet-rendition/imagenet-r"),
    ("imagenet_r", "imagenet-rendition/classnames.txt"),
]


@pytest.mark.parametrize(("name", "missing"), MISSING)
def test_a_missing_file_or_folder_is_named(tmp_path, name, missing):
    make_layout(tmp_path, name)
    path = tmp_path / missing
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        load_coop_dataset(name, tmp_path)
    assert str(path) in str(error.value)


def test_missing_layout_message_describes_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_coop_dataset("oxford_pets", tmp_path)
    message = str(error.value)
    assert f"{tmp_path / 'oxford_pets' / 'images'}{os.sep}" in message
    assert str(tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json") in message
    assert "DATASETS.md" in message


def test_unknown_name_lists_the_valid_names(tmp_path):
    with pytest.raises(ValueError, match="oxford_pets") as error:
        load_coop_dataset("oxford_pet", tmp_path)
    assert all(name in str(error.value) for name in DATASET_NAMES)


def test_a_missing_listed_image_fails_with_the_complete_list_unless_skipped(tmp_path):
    _, expected = make_layout(tmp_path, "dtd")
    gone = [expected["test"][0][0], expected["train"][1][0]]
    for path in gone:
        os.remove(path)
    with pytest.raises(FileNotFoundError, match="2 image") as error:
        load_coop_dataset("dtd", tmp_path)
    assert all(path in str(error.value) for path in gone) and "--skip_missing_images" in str(error.value)
    dataset = load_coop_dataset("dtd", tmp_path, skip_missing_images=True)
    assert gone[0] not in image_paths(dataset["test"])
    assert (missing_images(dataset["test"]), missing_images(dataset["train"]), missing_images(dataset["val"])) == (
        1,
        1,
        0,
    )


def test_a_malformed_split_file_is_named(tmp_path):
    make_layout(tmp_path, "dtd")
    split_path = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    split_path.write_text("{not json")
    with pytest.raises(ValueError, match="split_zhou_DescribableTextures.json"):
        load_coop_dataset("dtd", tmp_path)
    split_path.write_text(json.dumps({"train": [["banded/x.jpg", 0]], "val": [], "test": []}))
    with pytest.raises(ValueError, match="split_zhou_DescribableTextures.json"):
        load_coop_dataset("dtd", tmp_path)


@pytest.fixture
def pets(tmp_path):
    """Five classes: 10 train, 6 val and 2 test images each."""
    make_layout(tmp_path, "oxford_pets", counts={"train": 10, "val": 6, "test": 2}, classes=PETS)
    return load_coop_dataset("oxford_pets", tmp_path)


def per_class(dataset, indices) -> dict[int, int]:
    labels = list(dataset["label"])
    counts: dict[int, int] = {}
    for index in indices:
        counts[labels[index]] = counts.get(labels[index], 0) + 1
    return counts


@pytest.mark.parametrize("shots", [1, 2, 8])
def test_few_shot_counts_per_class(pets, shots):
    indices = coop_few_shot_split(pets, shots=shots, seed=1)
    assert set(indices) == {"train", "val"}
    assert per_class(pets["train"], indices["train"]) == dict.fromkeys(range(5), shots)
    assert per_class(pets["val"], indices["val"]) == dict.fromkeys(range(5), min(shots, 4))
    assert all(len(set(chosen)) == len(chosen) for chosen in indices.values())
    chosen = apply_split(pets, indices)
    assert (len(chosen["train"]), len(chosen["val"]), len(chosen["test"])) == (5 * shots, 5 * min(shots, 4), 10)
    assert rows_of(chosen["test"]) == rows_of(pets["test"])


def test_few_shot_is_seeded(pets):
    assert coop_few_shot_split(pets, 4, seed=1) == coop_few_shot_split(pets, 4, seed=1)
    assert coop_few_shot_split(pets, 4, seed=1)["train"] != coop_few_shot_split(pets, 4, seed=2)["train"]


def test_few_shot_draws_as_dassl_does(pets):
    def dassl_generate_fewshot_dataset(labels: list[int], shots: int) -> list[int]:
        tracker: dict[int, list[int]] = {}
        for index, label in enumerate(labels):
            tracker.setdefault(label, []).append(index)
        chosen = []
        for items in tracker.values():
            chosen.extend(random.sample(items, shots) if len(items) >= shots else items)
        return chosen

    state = random.getstate()
    try:
        random.seed(3)
        expected = {
            "train": dassl_generate_fewshot_dataset(list(pets["train"]["label"]), 8),
            "val": dassl_generate_fewshot_dataset(list(pets["val"]["label"]), 4),
        }
    finally:
        random.setstate(state)
    assert coop_few_shot_split(pets, 8, seed=3) == expected


def test_a_class_with_fewer_images_than_shots_keeps_them_all(pets, caplog):
    with caplog.at_level(logging.WARNING):
        indices = coop_few_shot_split(pets, shots=12, seed=0)
    assert per_class(pets["train"], indices["train"]) == dict.fromkeys(range(5), 10)
    assert per_class(pets["val"], indices["val"]) == dict.fromkeys(range(5), 4)
    assert "abyssinian" in caplog.text


def test_few_shot_keeps_imagenet_val_whole_and_refuses_test_only_data(tmp_path):
    make_layout(tmp_path, "imagenet")
    make_layout(tmp_path, "imagenetv2")
    imagenet = load_coop_dataset("imagenet", tmp_path)
    indices = coop_few_shot_split(imagenet, shots=2, seed=0)
    assert list(indices) == ["train"]
    chosen = apply_split(imagenet, indices)
    assert per_class(chosen["train"], range(len(chosen["train"]))) == dict.fromkeys(range(3), 2)
    assert len(chosen["val"]) == len(chosen["test"]) == 6
    with pytest.raises(ValueError, match="train"):
        coop_few_shot_split(load_coop_dataset("imagenetv2", tmp_path), shots=2, seed=0)
    with pytest.raises(ValueError, match="shots"):
        coop_few_shot_split(imagenet, shots=0, seed=0)


@pytest.mark.parametrize("name", ["oxford_pets", "stanford_cars", "imagenet", "fgvc_aircraft"])
def test_split_file_round_trip_onto_another_data_root(tmp_path, name):
    first_root = tmp_path / "first"
    make_layout(first_root, name)
    first = load_coop_dataset(name, first_root)
    indices = coop_few_shot_split(first, shots=2, seed=5)
    split_path = tmp_path / "splits" / f"{name}_shot2_seed5.json"
    save_split_file(split_path, first, indices, shots=2, seed=5)

    content = json.loads(split_path.read_text())
    assert content["provenance"] == {"shots": 2, "seed": 5, "dataset": name}
    assert str(first_root) not in split_path.read_text()
    directory, image_dir = DIRECTORIES[name]
    for split, rows in content["splits"].items():
        chosen = apply_split(first, indices)[split]
        assert [row[1] for row in rows] == list(chosen["label"])
        prefix = f"{first_root / directory}{os.sep}"
        assert [row[0] for row in rows] == [path[len(prefix) :].replace(os.sep, "/") for path in image_paths(chosen)]

    # On another machine: a copy under a data root that itself contains the dataset's folder names.
    second_root = tmp_path / "second" / directory / (image_dir or "x")
    shutil.copytree(first_root, second_root)
    second = load_coop_dataset(name, second_root)
    second_indices = load_split_file(split_path, second)
    assert second_indices == indices
    for split in indices:
        first_paths = image_paths(apply_split(first, indices)[split])
        second_paths = image_paths(apply_split(second, second_indices)[split])
        assert [os.path.relpath(path, first_root) for path in first_paths] == [
            os.path.relpath(path, second_root) for path in second_paths
        ]


def corrupt(content: dict) -> dict:
    content["splits"]["train"][1][0] = "images/not_there.jpg"
    return content


def relabel(content: dict) -> dict:
    content["splits"]["train"][0][1] = (content["splits"]["train"][0][1] + 1) % 5
    return content


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (corrupt, "images/not_there.jpg"),
        (relabel, "label"),
        (lambda content: {**content, "provenance": {"dataset": "dtd"}}, "dtd"),
        (lambda content: {**content, "splits": {"train": [["images/a.jpg"]]}}, "rows"),
        (lambda content: {**content, "splits": {"extra": []}}, "extra"),
        (lambda content: ["not", "a", "split", "file"], "save_split_file"),
    ],
)
def test_a_mismatched_split_file_is_named(tmp_path, pets, change, message):
    split_path = tmp_path / "pets_split.json"
    save_split_file(split_path, pets, coop_few_shot_split(pets, 2, seed=0), shots=2, seed=0)
    split_path.write_text(json.dumps(change(json.loads(split_path.read_text()))))
    with pytest.raises(ValueError, match=message) as error:
        load_split_file(split_path, pets)
    assert str(split_path) in str(error.value)


def test_a_split_file_that_is_not_json_is_named(tmp_path, pets):
    split_path = tmp_path / "broken.json"
    split_path.write_text('{"format": ')
    with pytest.raises(ValueError, match="broken.json"):
        load_split_file(split_path, pets)


def test_base_and_new_classes(pets):
    base = subsample_classes(pets, "base")
    new = subsample_classes(pets, "new")
    for split, per_split in (("train", 10), ("val", 6), ("test", 2)):
        assert base[split].features["label"].names == ["abyssinian", "bengal", "birman"]
        assert new[split].features["label"].names == ["bombay", "sphynx"]
        assert sorted(rows_of(base[split])) == sorted(row for row in rows_of(pets[split]) if row[1] < 3)
        assert sorted(rows_of(new[split])) == sorted(
            (path, label - 3) for path, label in rows_of(pets[split]) if label >= 3
        )
        assert (len(base[split]), len(new[split])) == (3 * per_split, 2 * per_split)
    assert subsample_classes(pets, "all") is pets
    with pytest.raises(ValueError, match="base"):
        subsample_classes(pets, "novel")


def test_base_and_new_labels_are_one_rule_for_training_and_evaluation(pets):
    names = ["cat", "dog", "bird", "fish", "cat"]
    assert base_new_labels(names) == ([0, 1, 2], [3, 4])  # CoCoOp: the first half, rounded up
    assert base_new_labels(names, new=["fish"]) == ([0, 1, 2, 4], [3])
    assert base_new_labels(names, base=["cat"]) == ([0, 4], [1, 2, 3])  # a repeated name names both classes
    with pytest.raises(ValueError, match="'cow' is not in"):
        base_new_labels(names, base=["cow"])
    kept = keep_classes(pets["test"], [4, 1])  # named classes, relabelled to their order in the list
    assert kept.features["label"].names == ["sphynx", "bengal"]
    assert sorted(rows_of(kept)) == sorted(
        (path, [4, 1].index(label)) for path, label in rows_of(pets["test"]) if label in (4, 1)
    )


def test_base_and_new_after_few_shot_and_on_test_only_data(tmp_path, pets):
    few = apply_split(pets, coop_few_shot_split(pets, 4, seed=0))
    new = subsample_classes(few, "new")
    assert per_class(new["train"], range(len(new["train"]))) == {0: 4, 1: 4}
    assert per_class(new["val"], range(len(new["val"]))) == {0: 4, 1: 4}
    make_layout(tmp_path, "imagenet_r")
    imagenet_r = load_coop_dataset("imagenet_r", tmp_path)
    assert subsample_classes(imagenet_r, "base")["test"].features["label"].names == ["goldfish", "tiger shark"]
    assert list(subsample_classes(imagenet_r, "new")["test"]["label"]) == [0, 0]
