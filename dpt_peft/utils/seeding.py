"""The seeds a run derives from its --seed, one stream per purpose: `seed_for(seed, purpose, *keys)`.

Each purpose's seeds come from `numpy.random.SeedSequence(seed, spawn_key=(purpose, *keys))`, so two purposes, or two
keys (epochs) of one purpose, never share a stream whatever the seeds: `seed + epoch` made seed 1 / epoch 1 draw what
seed 2 / epoch 0 draws.

Not derived here, on purpose: CoOp's protocol draws keep CoOp's seeding, so that a seed picks CoOp's images (the
benchmark few-shot split, `coop_splits.coop_few_shot_split`: a `random.Random(seed)` drawing as Dassl's sampler); and
the draws seeded with --seed itself stay so (the few-shot training set of other datasets, `few_shot.draw_shots`; the
crops, `augmentation.crop_draws(seed, epoch, image)`; the global generators, `accelerate.utils.set_seed`).
"""

from __future__ import annotations

import zlib

import numpy as np

PURPOSES = {
    "task_schedule": "the task of every step of a multitask epoch (key: the epoch)",
    "validation_shots": "the few-shot validation set of a dataset without CoOp's split",
    "loader_shuffle": "the order of the training images in an epoch (key: the epoch)",
}
# The shuffle keeps the seeds it had before this module, `seed * 1_000_003 + epoch` (a distinct seed for every
# (seed, epoch) below a million epochs): the numbers README.md and docs/results.md report were measured with it.
LEGACY_SHUFFLE_STRIDE = 1_000_003


def seed_for(seed: int, purpose: str, *keys: int) -> int:
    """The seed of `purpose` (one of `PURPOSES`) for `keys`, a 64-bit integer for `torch.Generator.manual_seed` or
    `numpy.random.default_rng`."""
    if purpose not in PURPOSES:
        raise ValueError(f"No random stream for {purpose!r}; the purposes are {sorted(PURPOSES)}.")
    if purpose == "loader_shuffle":
        (epoch,) = keys
        return seed * LEGACY_SHUFFLE_STRIDE + epoch
    stream = zlib.crc32(purpose.encode())  # the same number on every machine and Python (unlike `hash`)
    sequence = np.random.SeedSequence(seed, spawn_key=(stream, *keys))
    return int(sequence.generate_state(1, np.uint64)[0])
