"""What synthetic stand-ins hide: CLIP's real ImageNet class list (two names repeated), missing listed images, the
data check before a grid, the cached ImageNet listing, and CoOp/CoCoOp's aggregation of the numbers."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from coop_layouts import AIRCRAFT, make_imagenet, make_layout, write_lines

from dpt_peft.data import coop_readers
from dpt_peft.data.check import check_data, instructions_for, require_data
from dpt_peft.data.coop_readers import load_coop_dataset, prompt_class_names
from dpt_peft.data.coop_splits import subsample_classes
from dpt_peft.experiments.benchmark_report import aggregate, markdown_table, write_report
from dpt_peft.experiments.published import DPT_PAPER, published_rows
from dpt_peft.utils.errors import UserInputError

IMAGENET_NAMES = (Path(__file__).parents[1] / "fixtures" / "imagenet_classnames.txt").read_text().splitlines()


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DPT_PEFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_imagenet(root, IMAGENET_NAMES)
    return root


def test_the_real_imagenet_list_loads_with_its_repeated_names(imagenet_root):
    dataset = load_coop_dataset("imagenet", imagenet_root)
    test = dataset["test"]
    shown = test.features["label"].names
    assert len(shown) == 1000 and len(set(shown)) == 1000
    assert (shown[657], shown[744], shown[836], shown[837]) == (
        "missile",
        "missile (2)",
        "sunglasses",
        "sunglasses (2)",
    )
    assert prompt_class_names(test) == IMAGENET_NAMES  # prompts as CoOp: both "missile" classes read "missile"
    assert sorted(set(test["label"])) == list(range(1000))


def test_base_and_new_halves_keep_the_names_to_prompt_with(imagenet_root):
    dataset = load_coop_dataset("imagenet", imagenet_root)
    new = subsample_classes(dataset, "new")["test"]
    assert prompt_class_names(new) == IMAGENET_NAMES[500:]
    assert new.features["label"].names[244] == "missile (2)" and prompt_class_names(new)[244] == "missile"


def test_a_config_with_the_real_list_warns_once_and_keeps_both(imagenet_root):
    from dpt_peft import DPTConfig

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DPTConfig(class_names=prompt_class_names(load_coop_dataset("imagenet", imagenet_root)["test"]))
    repeats = [w for w in caught if "more than once" in str(w.message)]
    assert len(repeats) == 1 and "missile" in str(repeats[0].message) and "sunglasses" in str(repeats[0].message)


def test_what_is_really_ambiguous_is_refused(tmp_path):
    make_layout(tmp_path, "fgvc_aircraft")
    write_lines(tmp_path / "fgvc_aircraft" / "variants.txt", [*AIRCRAFT, AIRCRAFT[0]])
    with pytest.raises(ValueError, match="twice"):  # its images are labelled by name: which label?
        load_coop_dataset("fgvc_aircraft", tmp_path)
    make_imagenet(tmp_path, ["cat", "dog"])
    write_lines(tmp_path / "imagenet" / "classnames.txt", ["n00000000 cat", "n00000001 dog", "n00000000 tiger"])
    with pytest.raises(ValueError, match="n00000000"):  # one folder given two names
        load_coop_dataset("imagenet", tmp_path)


def test_a_classnames_file_saved_as_latin_1_is_refused_naming_the_file_and_line(tmp_path):
    make_imagenet(tmp_path, ["cat", "dog"])
    (tmp_path / "imagenet" / "classnames.txt").write_bytes(b"n00000000 cat\r\nn00000001 caf\xe9 dog\r\n")
    with pytest.raises(UserInputError, match=r"classnames.txt is not UTF-8 text \(byte 0xe9 on line 2\)"):
        load_coop_dataset("imagenet", tmp_path)


def test_the_imagenet_listing_is_cached_by_the_folders_state(tmp_path, cache_root, monkeypatch):
    make_imagenet(tmp_path, ["cat", "dog"], per_class=2)
    first = load_coop_dataset("imagenet", tmp_path)["train"]["label"]
    assert len(list((cache_root / "listings").iterdir())) == 2  # train and val
    listed = []
    monkeypatch.setattr(coop_readers, "_list_files", lambda path: listed.append(path) or [])
    assert load_coop_dataset("imagenet", tmp_path)["train"]["label"] == first and listed == []
    extra = tmp_path / "imagenet" / "images" / "train" / "n00000001" / "new.JPEG"
    extra.write_bytes(b"")
    os.utime(extra.parent, ns=(1, 1))  # a new file changes its folder's mtime (set here so the test is exact)
    load_coop_dataset("imagenet", tmp_path)
    assert listed == [str(extra.parent)] or str(extra.parent) in listed


def test_check_data_says_what_is_missing_and_where_to_get_it(tmp_path):
    make_layout(tmp_path, "dtd")
    make_layout(tmp_path, "eurosat")
    os.remove(tmp_path / "eurosat" / "2750" / "Forest" / "test_1.jpg")
    dtd, eurosat, ucf = check_data(tmp_path, ["dtd", "eurosat", "ucf101"])
    assert dtd.ok and dtd.images == {"train": 6, "val": 4, "test": 4} and dtd.num_classes == 2
    assert (
        not eurosat.ok and "Forest/test_1.jpg" in eurosat.summary() and instructions_for("eurosat") in eurosat.summary()
    )
    assert not ucf.ok and "ucf101" in ucf.summary() and ucf.summary().endswith("#ucf101)")
    assert check_data(tmp_path, ["eurosat"], skip_missing_images=True)[0].missing_images["test"] == 1
    with pytest.raises(FileNotFoundError, match="2 of 3 datasets") as error:
        require_data(tmp_path, ["dtd", "eurosat", "ucf101"])
    assert "eurosat: NOT READY" in str(error.value) and "ucf101: NOT READY" in str(error.value)
    with pytest.raises(ValueError, match="valid names"):
        check_data(tmp_path, ["ucf"])
    make_layout(tmp_path, "imagenet")
    (imagenet,) = check_data(tmp_path, ["imagenet"])
    assert imagenet.ok and "3 class folders found where DATASETS.md states 1000" in imagenet.summary()


def result(dataset: str, seed: int, **metrics: float) -> dict:
    return {"protocol": "p", "dataset": dataset, "method": "dpt", "shots": 16, "seed": seed, **metrics}


def test_aggregation_is_coop_and_cocoop_exact():
    results = [
        result("eurosat", 1, base_accuracy=0.9, new_accuracy=0.5, harmonic_mean=0.642857, skipped_images=1),
        result("eurosat", 2, base_accuracy=0.8, new_accuracy=0.7, harmonic_mean=0.746667, missing_images=3),
        result("caltech101", 1, base_accuracy=0.95, new_accuracy=0.9, harmonic_mean=0.924324),
        result("caltech101", 2, base_accuracy=0.97, new_accuracy=0.92, harmonic_mean=0.944339),
    ]
    rows = aggregate("base_to_new", results)
    by = {(r["dataset"], r["metric"]): r for r in rows}
    assert [r["dataset"] for r in rows][:4] == ["caltech101"] * 3 + ["eurosat"]  # the papers' order
    base = by[("eurosat", "base_accuracy")]
    assert base["std"] == pytest.approx(np.std([0.9, 0.8])) == pytest.approx(0.05)  # population, not sample
    assert base["ci95"] == pytest.approx(1.96 * 0.05 / np.sqrt(2))
    assert (base["skipped_images"], base["missing_images"]) == (1, 3)
    hm = by[("eurosat", "harmonic_mean")]  # CoCoOp: HM of the averaged base (0.85) and new (0.6)
    assert hm["mean"] == pytest.approx(2 * 0.85 * 0.6 / 1.45) and hm["std"] is None
    average_base, average_new = (0.85 + 0.96) / 2, (0.6 + 0.91) / 2
    assert by[("average", "base_accuracy")]["mean"] == pytest.approx(average_base)
    hm_of_averages = 2 * average_base * average_new / (average_base + average_new)
    assert by[("average", "harmonic_mean")]["mean"] == pytest.approx(hm_of_averages)
    table = "\n".join(markdown_table("base_to_new", rows, confidence_interval=True))
    assert "| eurosat | dpt | 16 | 85.00 ± 5.00 [± 6.93] | 60.00 ± 10.00 [± 13.86] | 70.34 | - | - | 1 | 3 |" in table
    assert "**average of 2 datasets**" in table


def test_transfer_protocols_average_their_targets_and_print_the_published_rows(tmp_path):
    results = [
        {**result("imagenet", seed, source_accuracy=0.7, eurosat=0.4 + seed / 10, caltech101=0.9), "protocol": "x"}
        for seed in (1, 2)
    ]
    rows = aggregate("cross_dataset", results)
    assert [r["metric"] for r in rows] == ["source_accuracy", "eurosat", "caltech101", "average"]
    assert rows[-1]["mean"] == pytest.approx(np.mean([(0.5 + 0.9) / 2, (0.6 + 0.9) / 2]))
    report = write_report("cross_dataset", rows, str(tmp_path)).read_text()
    header = next(line for line in report.splitlines() if line.startswith("| dataset"))
    assert (
        header.index("source accuracy") < header.index("caltech101") < header.index("eurosat") < header.index("average")
    )
    assert (
        "| imagenet | CoOp | 71.51 | 93.70 | 46.39 | 63.88 | two or three later papers' copies of the original table |"
        in report
    )
    assert DPT_PAPER in report
    assert "skipped_images" in (tmp_path / "cross_dataset" / "results.csv").read_text().splitlines()[0]


def test_published_numbers_are_consistent_with_their_averages():
    """Spot values, and a transcription check inside the data: each method's published base-to-new average equals
    the mean of its 11 per-dataset rows (as the sources' averages are), to the sources' rounding."""
    rows = published_rows("base_to_new", ["eurosat"])
    dpt = next(row for row in rows if row.method.startswith("DPT"))
    assert dpt.dataset == "average" and dpt.metrics["new_accuracy"] == 29.23 and "LoGoPrompt" in dpt.source
    coop = next(row for row in rows if row.method == "CoOp" and row.dataset == "eurosat")
    assert coop.metrics == {"base_accuracy": 92.19, "new_accuracy": 54.74, "harmonic_mean": 68.69}
    every = published_rows("base_to_new")
    checked = 0
    for method in {row.method for row in every}:
        per_dataset = [row for row in every if row.method == method and row.dataset != "average"]
        average = [row for row in every if row.method == method and row.dataset == "average"]
        if len(per_dataset) == 11 and average:
            for metric in ("base_accuracy", "new_accuracy"):
                mean = sum(row.metrics[metric] for row in per_dataset) / 11
                assert mean == pytest.approx(average[0].metrics[metric], abs=0.02), (method, metric)
            checked += 1
    assert checked >= 4  # CLIP, CoOp, CoCoOp, MaPLe, PromptSRC publish every dataset


def test_results_json_round_trip_keeps_counts(tmp_path):
    path = tmp_path / "result.json"
    path.write_text(json.dumps(result("dtd", 1, accuracy=0.5, zero_shot_accuracy=0.4, skipped_images=2)))
    rows = aggregate("few_shot", [json.loads(path.read_text())])
    assert {r["metric"]: r["skipped_images"] for r in rows} == {"accuracy": 2, "zero_shot_accuracy": 2}


def test_train_and_evaluate_imagenet_with_a_repeated_name_through_the_cli(tmp_path, clip_path):
    from dpt_peft.cli import evaluate_main, train_main

    make_imagenet(tmp_path / "data", ["cat", "dog", "cat"], per_class=2)
    data = ["--dataset", "imagenet", "--data_root", str(tmp_path / "data"), "--model_name_or_path", clip_path]
    small = ["--epochs", "1", "--batch_size", "2", "--num_text_tokens", "1", "--zero_shot_template", "{}."]
    with pytest.warns(UserWarning, match="more than once"):
        metrics = train_main(
            [*data, *small, "--shots", "1", "--report_to", "none", "--output_dir", str(tmp_path / "run")]
        )
    assert list(metrics["per_class_accuracy"]) == ["cat", "dog", "cat (2)"]
    with pytest.warns(UserWarning, match="more than once"):
        report = evaluate_main(
            [*data, "--adapter", str(tmp_path / "run" / "adapter"), "--output_dir", str(tmp_path / "e")]
        )
    assert list(report["per_class_accuracy"]) == ["cat", "dog", "cat (2)"] and report["num_images"] == 6
