"""The rows a grid compares (issues 27 and 28): every method of train (the linear probe, LoRA by name), named variants
with their own train flags, one table with the costs, n/a where a method cannot score, and base-to-new's zero-shot
row with its HM."""

from __future__ import annotations

import csv
import json

import pytest
from coop_layouts import make_layout

import dpt_peft.experiments.grid as grid_module
from dpt_peft.cli import benchmark_main
from dpt_peft.cli.parsers import ablation_parser, benchmark_parser
from dpt_peft.config import DPTConfig
from dpt_peft.experiments.ablation import ablation_runs, ablation_variants, run_ablation, write_report
from dpt_peft.experiments.benchmark_report import harmonic_mean
from dpt_peft.experiments.grid import Variant
from dpt_peft.utils.errors import UserInputError

SMALL = ["--epochs", "1", "--batch_size", "4", "--eval_batch_size", "64", "--num_text_tokens", "1"]
SHORT_TEMPLATE = ["--zero_shot_template", "{}."]  # the tiny CLIP's text encoder has 24 positions
# What a fake run reports, per row: (accuracy by seed, trainable parameters, train seconds).
FAKE = {"linear_probe": ([0.9, 0.8], 325, 0.5), "coop": ([0.7, 0.9], 2048, 10.0), "fast": ([0.6, 0.6], 2048, 4.0)}


def fake_train(args, overrides):
    row = "fast" if args.epochs == 3 else args.method
    accuracies, parameters, seconds = FAKE[row]
    return {
        "accuracy": accuracies[args.seed - 1],
        "zero_shot_accuracy": 0.5,
        "trainable_parameters": parameters,
        "train_seconds": seconds,
    }


def test_the_ablation_table_has_every_row_with_its_costs(tmp_path, monkeypatch):
    monkeypatch.setattr(grid_module, "train", fake_train)
    (variant,) = ablation_parser().parse_known_args(["--variant", "fast=--method coop --epochs 3"])[0].variant
    rows = ablation_variants(["linear_probe", "coop"], [variant])
    results = run_ablation(str(tmp_path / "runs"), (1, 2), {"report_to": "none"}, variants=rows)
    assert results.accuracies == {
        "zero_shot": [0.5, 0.5],
        "linear_probe": [0.9, 0.8],
        "coop": [0.7, 0.9],
        "fast": [0.6, 0.6],
    }
    markdown, figure = tmp_path / "results.md", tmp_path / "ablation.png"
    write_report(results.accuracies, str(markdown), str(figure), "test", costs=results.costs, variants=rows)
    text = markdown.read_text()
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert (
        lines[0]
        == "| method | mean accuracy (%) | std | per seed (%) | trainable parameters | train time per run (s) |"
    )
    assert lines[1:] == [
        "| Zero-shot | 50.0 | 0.0 | 50.0, 50.0 | 0 | - |",
        "| Linear probe | 85.0 | 7.1 | 90.0, 80.0 | 325 | 0.5 |",
        "| CoOp | 80.0 | 14.1 | 70.0, 90.0 | 2,048 | 10.0 |",
        "| fast | 60.0 | 0.0 | 60.0, 60.0 | 2,048 | 4.0 |",
    ]
    assert "- fast: `--method coop --epochs 3`" in text and figure.stat().st_size > 1000
    assert list(json.loads((tmp_path / "results.json").read_text())) == ["zero_shot", "linear_probe", "coop", "fast"]


def test_a_variants_flags_reach_its_runs_identity_and_folder(tmp_path):
    (variant,) = (
        ablation_parser()
        .parse_known_args(
            ["--variant", "src=--method dpt --consistency_weights 10 25 1 --prompt_averaging gaussian --epochs 4"]
        )[0]
        .variant
    )
    assert variant.method == "dpt" and variant.config_options == {"consistency_weights": [10.0, 25.0, 1.0]}
    runs = ablation_runs(
        str(tmp_path), (1,), {"report_to": "none"}, {"num_text_tokens": 2}, [Variant.of_method("dpt"), variant]
    )
    plain, src = runs
    assert src.args.output_dir == str(tmp_path / "src_seed1") and src.label == "src"
    assert (src.args.prompt_averaging, src.args.epochs, plain.args.prompt_averaging) == ("gaussian", 4, "none")
    identity = src.args.run_identity(DPTConfig.for_method("dpt", class_names=["a", "b"], **src.config_overrides))
    assert list(identity["dpt_config"]["consistency_weights"]) == [10.0, 25.0, 1.0]
    assert identity["dpt_config"]["num_text_tokens"] == 2 and identity["prompt_averaging"] == "gaussian"
    probe = ablation_runs(str(tmp_path), (1,), {}, {"num_text_tokens": 2}, [Variant.of_method("linear_probe")])[0]
    assert probe.config_overrides.get("num_text_tokens") != 2  # a probe learns no prompts: the grid's are not its


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "coop", "sgd"], "'sgd' is not a method of train"),
        (["--methods", "coop", "coop"], "the row 'coop' is given twice"),
        (["--variant", "a/b=--epochs 2"], "a row's name names its runs' folders"),
        (["--variant", "x=--seed 3"], "--seed is set by the grid"),
        (["--method", "coop"], "--method coop would train every row as coop"),
    ],
)
def test_rows_that_cannot_be_run_are_refused_before_any_run(tmp_path, argv, message, monkeypatch):
    monkeypatch.setattr(grid_module, "train", lambda *a: pytest.fail("trained"))
    from dpt_peft.cli import ablation_main

    with pytest.raises(UserInputError, match=message):
        ablation_main(["--output_dir", str(tmp_path), "--seeds", "1", *argv])


def test_a_variant_with_flags_train_does_not_take_is_one_argparse_error(capsys):
    with pytest.raises(SystemExit):
        benchmark_parser().parse_known_args(["--data_root", "d", "--variant", "x=--no_such_flag 1"])
    assert "argument --variant: 'x=--no_such_flag 1': unrecognized arguments: --no_such_flag" in capsys.readouterr().err


def grid(tmp_path, clip_path, protocol: str, datasets: list[str], *flags: str) -> str:
    argv = [
        *("--protocol", protocol, "--data_root", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out")),
        *("--datasets", *datasets, "--model_name_or_path", clip_path, *flags, *SMALL, *SHORT_TEMPLATE),
    ]
    return benchmark_main(argv)


def test_base_to_new_opens_with_zero_shot_and_a_probe_reads_n_a_for_new_classes(tmp_path, clip_path):
    animals = [(name.capitalize(), name) for name in ("cat", "dog", "bird", "fish")]
    make_layout(tmp_path / "data", "oxford_pets", classes=animals)
    grid(
        tmp_path,
        clip_path,
        "base_to_new",
        ["oxford_pets"],
        "--shots",
        "2",
        "--seeds",
        "1",
        "2",
        "--methods",
        "coop",
        "linear_probe",
    )
    out = tmp_path / "out" / "base_to_new"
    with open(out / "results.csv") as f:
        rows = {(r["method"], r["metric"]): r for r in csv.DictReader(f) if r["dataset"] == "oxford_pets"}
    results = [
        json.loads((out / "oxford_pets" / "coop" / f"shots2_seed{seed}" / "result.json").read_text()) for seed in (1, 2)
    ]
    base = sum(r["zero_shot_base_accuracy"] for r in results) / 2
    new = sum(r["zero_shot_new_accuracy"] for r in results) / 2
    assert float(rows[("zero_shot", "base_accuracy")]["mean"]) == pytest.approx(base)
    assert float(rows[("zero_shot", "harmonic_mean")]["mean"]) == pytest.approx(harmonic_mean(base, new))
    assert (
        rows[("linear_probe", "new_accuracy")]["mean"] == ""
        and "cannot score new" in rows[("linear_probe", "new_accuracy")]["note"]
    )
    probe = json.loads((out / "oxford_pets" / "linear_probe" / "shots2_seed1" / "result.json").read_text())
    assert probe["new_accuracy"] is None and 0 <= probe["base_accuracy"] <= 1 and probe["trainable_parameters"] > 0

    ours = (out / "results.md").read_text().split("## Published")[0]
    table = [line for line in ours.splitlines() if line.startswith("| oxford_pets")]
    assert [line.split(" | ")[1] for line in table] == ["zero-shot CLIP", "linear_probe", "coop"]
    assert table[1].count("n/a") == 2  # new and HM; base is scored
    assert (
        "n/a (linear_probe): a linear probe has weights only for the classes it was trained on"
        in (out / "results.md").read_text()
    )


def test_a_probe_is_scored_on_its_own_classes_across_domains_and_n_a_across_datasets(tmp_path, clip_path):
    for name in ("imagenet", "oxford_pets", "imagenet_a", "imagenetv2"):
        make_layout(tmp_path / "data", name)
    flags = ("--shots", "1", "--seeds", "1", "--methods", "linear_probe")
    grid(tmp_path, clip_path, "cross_dataset", ["imagenet", "oxford_pets"], *flags)
    run = tmp_path / "out" / "cross_dataset" / "imagenet" / "linear_probe" / "shots1_seed1"
    result = json.loads((run / "result.json").read_text())
    assert result["oxford_pets"] is None and "another dataset's" in result["not_scored"]["oxford_pets"]
    grid(tmp_path, clip_path, "domain_generalization", ["imagenet_a", "imagenetv2"], *flags)
    run = tmp_path / "out" / "domain_generalization" / "imagenet" / "linear_probe" / "shots1_seed1"
    result = json.loads((run / "result.json").read_text())
    assert 0 <= result["imagenetv2"] <= 1  # ImageNet's classes: the probe's own
    assert result["imagenet_a"] is None  # this mini ImageNet lacks two of its mini ImageNet-A's classes
