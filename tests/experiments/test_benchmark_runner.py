"""The benchmark runner (`dpt-peft benchmark`) on synthetic mini copies of the CoOp layouts with a tiny CLIP."""

from __future__ import annotations

import csv
import json

import pytest
from coop_layouts import make_layout

import dpt_peft.experiments.grid as grid_module
from dpt_peft.cli import benchmark_main
from dpt_peft.experiments.benchmark import plan
from dpt_peft.training.run_layout import continue_options

SMALL = ["--epochs", "1", "--batch_size", "4", "--eval_batch_size", "64", "--num_text_tokens", "1"]
SHORT_TEMPLATE = ["--zero_shot_template", "{}."]  # the tiny CLIP's text encoder has 24 positions


def grid(tmp_path, clip_path, protocol: str, datasets: list[str], *flags: str) -> str:
    argv = [
        *("--protocol", protocol, "--data_root", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out")),
        *("--datasets", *datasets, "--model_name_or_path", clip_path, *flags, *SMALL, *SHORT_TEMPLATE),
    ]
    return benchmark_main(argv)


def test_plan_follows_the_protocols():
    few = plan("few_shot", ["dtd", "eurosat"], [1, 16], [1, 2, 3], ["coop", "dpt"])
    assert len(few) == 2 * 2 * 3 * 2 and {r.shots for r in few} == {1, 16}
    transfer = plan("cross_dataset", ["dtd"], [1, 16], [1, 2, 3], ["dpt"])
    assert {(r.dataset, r.shots) for r in transfer} == {("imagenet", 16)}
    with pytest.raises(ValueError, match="not a CoOp dataset"):
        plan("few_shot", ["cifar10"], [1], [1], ["dpt"])


def test_few_shot_grid_aggregates_and_resumes(tmp_path, clip_path, monkeypatch):
    for name in ("oxford_pets", "dtd"):
        make_layout(tmp_path / "data", name)
    few_shot = ("few_shot", ["oxford_pets", "dtd"], "--shots", "1", "2", "--seeds", "1", "2", "--methods", "coop")
    report = grid(tmp_path, clip_path, *few_shot)
    out = tmp_path / "out" / "few_shot"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    accuracy = [r for r in rows if r["metric"] == "accuracy" and r["dataset"] != "average"]
    assert len(accuracy) == 2 * 2 and all(r["seeds"] == "2" for r in accuracy)  # (dataset, shots), over 2 seeds
    assert [r["dataset"] for r in rows if r["metric"] == "accuracy"] == ["oxford_pets"] * 2 + ["dtd"] * 2 + [
        "average"
    ] * 2
    assert all(r["skipped_images"] == "0" and r["missing_images"] == "0" for r in rows)
    markdown = (out / "results.md").read_text()
    assert "| oxford_pets | coop | 2 |" in markdown and report.endswith("results.md")
    assert "| **average of 2 datasets** | coop | 2 |" in markdown and "| skipped | missing |" in markdown
    assert "CoOp (ResNet-50, not ViT-B/16)" in markdown  # the published row beside ours
    assert (out / "accuracy_vs_shots.png").stat().st_size > 1000
    split = json.loads((out / "dtd" / "coop" / "shots2_seed1" / "train" / "splits" / "dtd.json").read_text())
    assert split["provenance"] == {"dataset": "dtd", "shots": 2, "seed": 1}

    # A second call skips finished runs; a run without result.json (killed during evaluation) is finished only.
    (out / "dtd" / "coop" / "shots1_seed2" / "result.json").unlink()
    trained = []
    monkeypatch.setattr(grid_module, "train", lambda args, overrides: trained.append(args))
    grid(tmp_path, clip_path, *few_shot)
    assert trained == [] and (out / "dtd" / "coop" / "shots1_seed2" / "result.json").exists()


def test_a_killed_run_continues_from_its_checkpoint(tmp_path):
    run = tmp_path / "train"
    assert continue_options(run) == {}
    run.mkdir()
    (run / "run.json").write_text("{}")
    assert continue_options(run) == {"overwrite_output_dir": True}  # died before its first checkpoint
    (run / "checkpoints" / "epoch_0").mkdir(parents=True)
    (run / "checkpoints" / "epoch_0" / "trainer_state.json").write_text("{}")
    assert continue_options(run) == {"resume_from_checkpoint": "latest"}


def test_base_to_new_grid_reports_the_harmonic_mean(tmp_path, clip_path):
    animals = [(name.capitalize(), name) for name in ("cat", "dog", "bird", "fish")]
    make_layout(tmp_path / "data", "oxford_pets", classes=animals)
    grid(tmp_path, clip_path, "base_to_new", ["oxford_pets"], "--shots", "2", "--seeds", "1", "--methods", "coop")
    result = json.loads(
        (tmp_path / "out" / "base_to_new" / "oxford_pets" / "coop" / "shots2_seed1" / "result.json").read_text()
    )
    base, new = result["base_accuracy"], result["new_accuracy"]
    assert result["harmonic_mean"] == pytest.approx(0 if base + new == 0 else 2 * base * new / (base + new))
    assert "harmonic mean" in (tmp_path / "out" / "base_to_new" / "results.md").read_text()


def test_imagenet_adapter_is_evaluated_across_datasets_and_domains(tmp_path, clip_path):
    for name in ("imagenet", "oxford_pets", "imagenet_a", "imagenet_r"):
        make_layout(tmp_path / "data", name)
    grid(
        tmp_path,
        clip_path,
        "cross_dataset",
        ["imagenet", "oxford_pets"],
        "--shots",
        "1",
        "--seeds",
        "1",
        "--methods",
        "coop",
    )
    result = json.loads(
        (tmp_path / "out" / "cross_dataset" / "imagenet" / "coop" / "shots1_seed1" / "result.json").read_text()
    )
    assert set(result) >= {"source_accuracy", "oxford_pets"} and 0 <= result["oxford_pets"] <= 1
    grid(
        tmp_path,
        clip_path,
        "domain_generalization",
        ["imagenet_a", "imagenet_r"],
        "--shots",
        "1",
        "--seeds",
        "1",
        "--methods",
        "coop",
    )
    table = (tmp_path / "out" / "domain_generalization" / "results.md").read_text()
    assert "source accuracy | imagenet a | imagenet r" in table
