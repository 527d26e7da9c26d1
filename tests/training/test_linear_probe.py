"""`--method linear_probe` (issue 28): CoOp's search of C re-computed by hand, exact scores on separable features, a
run's reports, the saved probe scored by `evaluate`, and the refusals."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file
from sklearn.linear_model import LogisticRegression

from dpt_peft.cli import evaluate_main, train_main
from dpt_peft.training.linear_probe import C_GRID, search_regularization
from dpt_peft.training.linear_probe_model import SplitFeatures, probe_logits, probe_tensors
from dpt_peft.utils.errors import UserInputError

# The keys every training run's metrics.json has (training/report.py), which a probe run's must have too.
RUN_KEYS = {
    "method",
    "zero_shot_accuracy",
    "accuracy",
    "zero_shot_mean_per_class_accuracy",
    "mean_per_class_accuracy",
    "per_class_accuracy",
    "num_images",
    "trainable_parameters",
    "num_train_images",
    "skipped_images",
    "epochs",
    "steps",
    "train_seconds",
    "train_images_per_s",
    "wall_time_s",
    "final_train_loss",
    "mixed_precision",
    "input_pipeline",
    "best_epoch",
    "best_val_accuracy",
    "adapter_epoch",
    "prompt_averaging",
    "zero_shot_ensemble",
}


def split(seed: int, per_class: int, spread: float, classes: int = 4, dim: int = 6) -> SplitFeatures:
    generator = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(classes, dim)) * 2
    labels = np.repeat(np.arange(classes), per_class)
    features = centres[labels] + spread * generator.normal(size=(len(labels), dim))
    return SplitFeatures(features, labels, labels)


def coop_search(train: SplitFeatures, val: SplitFeatures) -> float:
    """CoOp's lpclip/linear_probe.py, written out: the grid, then 8 steps of its binary search."""

    def accuracy(c: float) -> float:
        model = LogisticRegression(solver="lbfgs", max_iter=1000, C=c).fit(train.features, train.labels)
        return sum(model.predict(val.features) == val.labels) / len(val.labels)

    search_list = [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]
    c_peak = search_list[int(np.argmax([accuracy(c) for c in search_list]))]
    c_left, c_right = 1e-1 * c_peak, 1e1 * c_peak
    for _ in range(8):
        acc_left, acc_right = accuracy(c_left), accuracy(c_right)
        if acc_left < acc_right:
            c_final = c_right
            c_left = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_right = np.log10(c_right)
        else:
            c_final = c_left
            c_right = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_left = np.log10(c_left)
        c_left, c_right = np.power(10, c_left), np.power(10, c_right)
    return c_final


@pytest.mark.filterwarnings("ignore::UserWarning")  # scikit-learn's ConvergenceWarning at the largest C
def test_the_search_picks_the_c_that_coops_code_picks():
    for seed in (0, 1, 2):
        train, val = split(seed, 4, 2.5), split(seed + 10, 4, 2.5)
        search = search_regularization(train, val)
        assert search.c == pytest.approx(coop_search(train, val), rel=1e-12)
        assert [entry["C"] for entry in search.trace[: len(C_GRID)]] == list(C_GRID)
        assert len(search.trace) == len(C_GRID) + 2 * 8  # every fit CoOp makes, in its order
        assert search.val_accuracy == next(e["val_accuracy"] for e in search.trace if e["C"] == search.c)


@pytest.mark.parametrize("classes", [2, 5])
def test_separable_features_are_classified_exactly_by_the_saved_weights(classes):
    train, test = split(0, 8, 0.05, classes), split(1, 20, 0.05, classes)
    search = search_regularization(train, split(2, 4, 0.05, classes))
    tensors = probe_tensors(search.classifier, classes)
    assert tensors["weight"].shape == (classes, 6) and tensors["bias"].shape == (classes,)
    predictions = probe_logits(tensors, test.features).argmax(-1)
    assert np.array_equal(predictions, search.classifier.predict(test.features))  # two rows for two classes too
    assert np.mean(predictions == test.labels) == 1.0


def test_a_probe_run_reports_as_a_training_run_and_evaluate_scores_its_probe(tmp_path, capsys):
    run = tmp_path / "probe_run"
    metrics = train_main(["--method", "linear_probe", "--output_dir", str(run), "--report_to", "none"])
    assert RUN_KEYS <= set(metrics) and metrics["method"] == "linear_probe"
    assert metrics == json.loads((run / "metrics.json").read_text())
    assert metrics["zero_shot_accuracy"] == pytest.approx(0.6467, abs=1e-4)  # the toy default's zero-shot, as DPT's
    assert metrics["accuracy"] > metrics["zero_shot_accuracy"] and metrics["num_images"] == 600
    assert metrics["regularization_C"] == next(
        e["C"] for e in reversed(metrics["regularization_search"]) if e["C"] == metrics["regularization_C"]
    )
    tensors = load_file(str(run / "probe" / "linear_probe.safetensors"))
    record = json.loads((run / "probe" / "linear_probe.json").read_text())
    assert set(tensors) == {"weight", "bias"} and len(record["class_names"]) == tensors["weight"].shape[0] == 5
    assert metrics["trainable_parameters"] == tensors["weight"].size + tensors["bias"].size
    assert json.loads((run / "run.json").read_text())["method"] == "linear_probe"

    report = evaluate_main(["--adapter", str(run), "--output_dir", str(tmp_path / "eval")])
    assert report["accuracy"] == pytest.approx(metrics["accuracy"]) and report["num_images"] == 600
    assert report["zero_shot_accuracy"] == pytest.approx(metrics["zero_shot_accuracy"])

    with pytest.raises(UserInputError, match="cannot score new classes"):
        evaluate_main(["--adapter", str(run), "--output_dir", str(tmp_path / "b2n"), "--base_to_new"])
    with pytest.raises(UserInputError, match="already holds this run"):
        train_main(["--method", "linear_probe", "--output_dir", str(run), "--report_to", "none"])
    with pytest.raises(UserInputError, match="holds a different run .*shots: 16 -> 8"):
        train_main(["--method", "linear_probe", "--output_dir", str(run), "--report_to", "none", "--shots", "8"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num_text_tokens", "8"], "--num_text_tokens is a prompt setting; --method linear_probe learns no prompts"),
        (["--tasks", "toy-position,toy-shape"], "fits one task's classifier; drop --tasks"),
        (["--push_to_hub"], "a linear probe is not one"),
    ],
)
def test_what_a_probe_cannot_do_is_refused_in_one_line(tmp_path, flags, message):
    with pytest.raises(UserInputError, match=message):
        train_main(["--method", "linear_probe", "--output_dir", str(tmp_path / "run"), *flags])
    assert not (tmp_path / "run").exists()


def test_without_scikit_learn_the_refusal_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)
    with pytest.raises(UserInputError, match=r"pip install 'dpt-peft\[probe\]'"):
        train_main(["--method", "linear_probe", "--output_dir", str(tmp_path / "run")])
