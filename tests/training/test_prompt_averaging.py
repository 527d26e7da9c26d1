"""--prompt_averaging gaussian (PromptSRC's GPA, issue 27): the weights are PromptSRC's closed form, the saved adapter
is the weighted average of the epochs' prompts, a run killed after an epoch resumes to the same average bit for bit,
and with the option off nothing changes. Also the named parts of the loss (`DPTOutput.loss_terms`) in history.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import killed_after_epoch
from safetensors.torch import load_file

from dpt_peft.cli import train_main
from dpt_peft.peft_model import DPTPeftModel
from dpt_peft.training.arguments import TrainArguments
from dpt_peft.training.prompt_averaging import PromptAverage, epoch_weights, gaussian_epoch_weights
from dpt_peft.utils.errors import UserInputError

SHORT = ["--epochs", "3", "--shots", "4", "--report_to", "none", "--eval_batch_size", "300"]
GAUSSIAN = ["--prompt_averaging", "gaussian", "--prompt_averaging_mean", "2", "--prompt_averaging_std", "1"]
WEIGHTS_FILE = "adapter_model.safetensors"


def run(output_dir: Path, *extra: str) -> dict:
    return train_main([*SHORT, "--output_dir", str(output_dir), *extra])


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS_FILE)


def promptsrc_weights(epochs: int, mean: float, std: float) -> np.ndarray:
    """trainers/promptsrc.py, lines 264-270 and 358-360, as written there."""
    gauss = lambda x: (1 / (std * np.sqrt(2 * np.pi))) * np.exp(-0.5 * ((x - mean) / std) ** 2)  # noqa: E731
    weights = np.array([gauss(a) for a in range(1, epochs + 1)])
    return weights / sum(weights)


@pytest.mark.parametrize(("epochs", "mean", "std"), [(20, 15, 1), (50, 30, 30), (20, 6, 10), (3, 2, 1)])
def test_the_weights_are_promptsrcs(epochs, mean, std):
    np.testing.assert_allclose(
        gaussian_epoch_weights(epochs, mean, std), promptsrc_weights(epochs, mean, std), rtol=1e-12
    )
    assert math.isclose(sum(gaussian_epoch_weights(epochs, mean, std)), 1.0, rel_tol=1e-12)


def test_the_default_mean_and_std_are_promptsrcs_base_to_new_scaled_to_the_epochs():
    assert epoch_weights(20, None, None) == gaussian_epoch_weights(20, 15, 1)
    assert epoch_weights(60, None, None) == gaussian_epoch_weights(60, 45, 3)


def test_the_average_equals_the_closed_form_over_a_recorded_sequence():
    generator = torch.Generator().manual_seed(0)
    sequence = [
        {"ctx": torch.randn(4, 8, generator=generator), "vis": torch.randn(2, 3, generator=generator)} for _ in range(6)
    ]
    weights = promptsrc_weights(6, 4, 1.5)
    average = PromptAverage(gaussian_epoch_weights(6, 4, 1.5))
    for epoch, parameters in enumerate(sequence):
        average.add(epoch, parameters)
    for key in ("ctx", "vis"):
        expected = sum(w * step[key].double().numpy() for w, step in zip(weights, sequence))
        np.testing.assert_allclose(average.average()[key].numpy(), expected, rtol=1e-12, atol=1e-15)
    restored = PromptAverage.from_tensors(average.weights, average.to_tensors())
    assert restored.total_weight == average.total_weight
    assert all(torch.equal(restored.sums[key], average.sums[key]) for key in average.sums)


def test_the_saved_adapter_is_the_weighted_average_of_the_epochs_prompts(tmp_path):
    metrics = run(tmp_path, *GAUSSIAN, "--checkpoints_to_keep", "3")
    epochs = [adapter(tmp_path / "checkpoints" / f"epoch_{e}" / "adapter") for e in range(3)]
    saved = adapter(tmp_path / "adapter")
    weights = promptsrc_weights(3, 2, 1)
    for key, value in saved.items():
        expected = sum(w * epoch[key].double() for w, epoch in zip(weights, epochs))
        torch.testing.assert_close(value, expected.float(), rtol=0, atol=1e-6)
    for key in saved:  # the last epoch's prompts are kept beside it
        assert torch.equal(adapter(tmp_path / "last_adapter")[key], epochs[-1][key])
    assert metrics["prompt_averaging"] == "gaussian" and metrics["adapter_epoch"] is None
    assert (metrics["prompt_averaging_mean"], metrics["prompt_averaging_std"]) == (2, 1)


def test_a_run_killed_after_an_epoch_resumes_to_the_same_average_bit_for_bit(tmp_path):
    straight = run(tmp_path / "straight", *GAUSSIAN)
    with killed_after_epoch(1):
        run(tmp_path / "resumed", *GAUSSIAN)
    assert (tmp_path / "resumed" / "checkpoints" / "epoch_1" / "prompt_average.safetensors").exists()
    resumed = run(tmp_path / "resumed", *GAUSSIAN, "--resume_from_checkpoint", "latest")
    first, second = adapter(tmp_path / "straight" / "adapter"), adapter(tmp_path / "resumed" / "adapter")
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    assert resumed["accuracy"] == straight["accuracy"]


def test_off_changes_nothing(tmp_path):
    metrics = run(tmp_path, "--checkpoints_to_keep", "1")
    last = adapter(tmp_path / "checkpoints" / "epoch_2" / "adapter")
    assert all(torch.equal(value, last[key]) for key, value in adapter(tmp_path / "adapter").items())
    assert not (tmp_path / "last_adapter").exists()
    assert not list((tmp_path / "checkpoints").rglob("prompt_average*"))
    assert metrics["prompt_averaging"] == "none" and metrics["adapter_epoch"] == 2
    assert metrics["zero_shot_ensemble"] is None  # the adapter config's own (none: the adapter alone)
    assert all("loss_terms" not in record for record in json.loads((tmp_path / "history.json").read_text()))


@pytest.mark.parametrize(
    ("values", "flag"),
    [
        ({"prompt_averaging": "gaussian", "save_best": True, "eval_every": 1}, "--save_best"),
        ({"prompt_averaging_mean": 3.0}, "--prompt_averaging_mean"),
        ({"prompt_averaging": "gaussian", "prompt_averaging_std": 0.0}, "--prompt_averaging_std"),
        ({"prompt_averaging": "gaussian", "prompt_averaging_mean": 1e4, "prompt_averaging_std": 1.0}, "no weight"),
    ],
)
def test_bad_averaging_flags_are_refused_in_one_line(tmp_path, values, flag):
    with pytest.raises(UserInputError, match=flag) as refused:
        TrainArguments(output_dir=str(tmp_path), **values)
    assert "\n" not in str(refused.value)


def test_the_named_parts_of_the_loss_are_averaged_into_history(tmp_path, monkeypatch):
    original = DPTPeftModel.forward

    def forward(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        if output.loss is not None:
            output.loss_terms = {"cross_entropy": output.loss.detach(), "constant": torch.tensor(0.25)}
        return output

    monkeypatch.setattr(DPTPeftModel, "forward", forward)
    run(tmp_path)
    for record in json.loads((tmp_path / "history.json").read_text()):
        assert record["loss_terms"]["constant"] == pytest.approx(0.25)
        assert record["loss_terms"]["cross_entropy"] == pytest.approx(record["loss"], rel=1e-6)
