"""The loaders a run iterates: parallel decoding settings, the training loader that yields augmented
`{"pixel_values", "labels"}` batches for the epoch it is set to, the evaluation loader whose batches are
`{"pixel_values", "labels"}` only, and the task schedule of multitask epochs. `run_loaders.build_loaders` makes them."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch

from .augmentation import DeviceAugmenter
from .batching import ImageBatcher, SkipCounter


def default_num_workers(local_processes: int = 1) -> int:
    """min(8, usable CPUs - 1), shared among the processes of this machine (one per GPU under Accelerate)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, (cpus - 1) // max(1, local_processes)))


def loader_kwargs(
    num_workers: int | None = None,
    *,
    persistent_workers: bool = True,
    prefetch_factor: int = 4,
    local_processes: int = 1,
    pin_memory: bool | None = None,
) -> dict:
    """DataLoader keyword arguments for a decoding loader: `num_workers` (default `default_num_workers`),
    `pin_memory` (default: when CUDA is available), and with workers `persistent_workers` and `prefetch_factor`.

    A persistent worker keeps the copy of the collate it started with: a training collate that reads a per-epoch
    attribute must share it (`ReportingImageBatcher` keeps `epoch` in shared memory), or run with
    `persistent_workers=False` (`ImageBatcher`): workers then start at each epoch's `iter(loader)`, copying the
    collate as it is then, at the cost of a start per epoch.
    """
    workers = default_num_workers(local_processes) if num_workers is None else int(num_workers)
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    kwargs: dict = {"num_workers": workers, "pin_memory": pin}
    if workers > 0:
        kwargs.update(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor)
    return kwargs


class TrainLoader:
    """A task's training batches, `{"pixel_values", "labels"}` whichever way the images come: decoded by the
    batcher (which crops them) or as cached uint8 squares that `augmenter` crops on the device. `set_epoch` is how
    the epoch reaches the crops on both paths; a batch without any readable image stays None (a step the loop skips).
    The unreadable images a `ReportingImageBatcher` reports are counted in `skips`."""

    def __init__(
        self,
        loader: Iterable,
        batcher: ImageBatcher | None = None,
        augmenter: DeviceAugmenter | None = None,
        skips: SkipCounter | None = None,
    ):
        if (batcher is None) == (augmenter is None):
            raise ValueError("A training loader augments either in its batcher or with a device augmenter.")
        self.loader, self.batcher, self.augmenter = loader, batcher, augmenter
        self.skips = SkipCounter() if skips is None else skips
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.batcher is not None:
            self.batcher.epoch = epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict | None]:
        for batch in self.loader:
            if self.augmenter is None:
                yield self.skips.take(batch)
            else:
                pixel_values = self.augmenter(batch["images"], self.epoch, batch["indices"])
                yield {"pixel_values": pixel_values, "labels": batch["labels"]}


class EvalLoader:
    """A held-out split's batches, each exactly `{"pixel_values", "labels"}`: the unreadable images its batcher
    reports (`ReportingImageBatcher`, in DataLoader workers or not) are counted in `skips`, and a batch left without
    any readable image is not yielded."""

    def __init__(self, loader: Iterable, skips: SkipCounter):
        self.loader, self.skips = loader, skips

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            batch = self.skips.take(batch)
            if batch is not None:
                yield batch


def task_schedule(loaders: dict, sampling: str, generator: torch.Generator) -> list[str]:
    """The task of every step of one epoch: each task's batch count (proportional, shuffled), or a uniform draw."""
    names = list(loaders)
    total = sum(len(loader) for loader in loaders.values())
    if sampling == "uniform":
        return [names[i] for i in torch.randint(len(names), (total,), generator=generator).tolist()]
    order = [name for name in names for _ in range(len(loaders[name]))]
    return [order[i] for i in torch.randperm(total, generator=generator).tolist()]


def scheduled_batches(loaders: dict, schedule: list[str]) -> Iterator[tuple[str, dict | None]]:
    """(task, batch) pairs following `schedule`; a task's loader restarts when it runs out."""
    iterators = {name: iter(loader) for name, loader in loaders.items()}
    for name in schedule:
        try:
            batch = next(iterators[name])
        except StopIteration:
            iterators[name] = iter(loaders[name])
            batch = next(iterators[name])
        yield name, batch
