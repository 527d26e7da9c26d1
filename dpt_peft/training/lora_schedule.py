"""CLIP-LoRA's iterations as the loop's epochs: the training batches of a `--method lora` run.

CLIP-LoRA counts iterations, not epochs: `while count_iters < total_iters: for images, target in train_loader: ...`
(lora.py), i.e. pass after pass over the shuffled few-shot set, 32 images a batch with the last one of each pass
short (`drop_last=False`), stopping after 500 x shots batches, wherever that falls in a pass. Our loop runs whole
epochs and checkpoints after each; on a small set one pass is a few batches (the toy: 80 images, 3 batches), so an
epoch per pass would mean thousands of checkpoints. Here an epoch is instead an equal part of the iteration stream
(`LoraRecipe.iterations_per_epoch`, 500 by default: one checkpoint per shot), cut from the same stream of passes:

- iteration i of the run is batch i mod P of pass i // P (P = ceil(images / batch)), whatever the epoch length;
- pass p's order is a permutation seeded by the run's seed and p (the `loader_shuffle` stream, as our DPT epochs);
- each pass's images carry their own augmentation index (pass x images + row), so an image drawn in several passes
  of one epoch gets a new crop each time, as in CLIP-LoRA, and the crops stay a function of (seed, epoch, index).

Everything is a function of the seed and the iteration, so a resumed run draws exactly what an uninterrupted one does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.batching import INDEX_COLUMN
from ..data.run_loaders import RunLoaders
from ..utils.seeding import seed_for

INDEX_STRIDE = 1 << 32  # above any image index: pass p's indices never meet another pass's


class IterationBatches(Sampler[list[int]]):
    """The batches of one epoch of the iteration stream: `iterations_per_epoch` batches, continuing the passes where
    the previous epoch left them. Indices are `pass * num_images + row` (`PassIndexed` maps them back)."""

    def __init__(
        self, num_images: int, batch_size: int, iterations_per_epoch: int, seed: int, epoch: Callable[[], int]
    ) -> None:
        self.num_images, self.batch_size = num_images, batch_size
        self.iterations_per_epoch, self.seed, self.epoch = iterations_per_epoch, seed, epoch
        self.batches_per_pass = math.ceil(num_images / batch_size)  # CLIP-LoRA's loader keeps the short last batch

    def __len__(self) -> int:
        return self.iterations_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        start = self.epoch() * self.iterations_per_epoch
        order, order_pass = None, -1
        for iteration in range(start, start + self.iterations_per_epoch):
            pass_index, batch = divmod(iteration, self.batches_per_pass)
            if pass_index != order_pass:
                order, order_pass = self.pass_order(pass_index), pass_index
            rows = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield [pass_index * self.num_images + row for row in rows]

    def pass_order(self, pass_index: int) -> list[int]:
        """The shuffled rows of one pass over the images."""
        generator = torch.Generator().manual_seed(seed_for(self.seed, "loader_shuffle", pass_index))
        return torch.randperm(self.num_images, generator=generator).tolist()


class PassIndexed(Dataset):
    """A training set addressed as `pass * len(images) + row`: the row's sample, its augmentation index moved to
    `pass * index_stride + index`, so each pass crops anew. A sample is a row dict (`INDEX_COLUMN`) or a decoded
    cache's `(pixels, label, index)`."""

    def __init__(self, images: Sequence, index_stride: int) -> None:
        self.images, self.index_stride = images, index_stride

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Any:
        pass_index, row = divmod(index, len(self.images))
        sample = self.images[row]
        if isinstance(sample, dict):
            if INDEX_COLUMN not in sample:
                return sample
            return {**sample, INDEX_COLUMN: pass_index * self.index_stride + sample[INDEX_COLUMN]}
        pixels, label, image_index = sample
        return pixels, label, pass_index * self.index_stride + image_index


def use_iteration_stream(loaders: RunLoaders, batch_size: int, iterations_per_epoch: int, seed: int) -> None:
    """Replace each (unprepared) training DataLoader of `loaders` by one over the iteration stream, keeping its
    collate function and worker settings."""
    for train_loader in loaders.train.values():
        loader: DataLoader = train_loader.loader
        images = loader.dataset
        batches = IterationBatches(
            len(images), batch_size, iterations_per_epoch, seed, epoch=lambda tl=train_loader: tl.epoch
        )
        train_loader.loader = DataLoader(
            PassIndexed(images, index_stride=INDEX_STRIDE),
            batch_sampler=batches,
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            persistent_workers=loader.persistent_workers,
            prefetch_factor=loader.prefetch_factor,
        )
