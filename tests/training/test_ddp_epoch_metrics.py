"""An epoch's loss and accuracy under DDP are the run's, reduced over the processes (issue 32, item 11), not the main
process's: what history.json and metrics.json's `final_train_loss` report."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dpt_peft.training.trainer import epoch_totals


def two_processes(other_rank: list[float]):
    """An accelerator of 2 processes whose `reduce` adds the other rank's totals, as a real all-reduce would."""

    def reduce(tensor, reduction):
        assert reduction == "sum"
        return tensor + torch.tensor(other_rank, dtype=tensor.dtype)

    return SimpleNamespace(num_processes=2, device=torch.device("cpu"), reduce=reduce)


def test_loss_and_accuracy_are_reduced_over_the_processes():
    # rank 0: 3 batches of mean loss 1.0, 20 of 24 right; rank 1: 3 batches of mean loss 2.0, 4 of 24 right
    loss_sum, batches, correct, seen = epoch_totals(two_processes([6.0, 3, 4, 24]), 3.0, 3, 20, 24)
    assert (batches, correct, seen) == (6, 24, 48)
    assert loss_sum / batches == pytest.approx(1.5)  # rank 0 alone reported 1.0
    assert correct / seen == pytest.approx(0.5)


def test_one_process_keeps_its_own_totals():
    single = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    assert epoch_totals(single, 2.5, 2, 7, 10) == (2.5, 2, 7, 10)
