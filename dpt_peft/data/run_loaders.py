"""`build_loaders`: every loader of a run from its tasks, in one place: the choice between decoding the training images
once (`decoded_cache.py`, cropped on the device) and decoding them every epoch (PIL), the device augmenters, and the
train, validation and test loaders, which all count unreadable images in one `SkipCounter`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.utils.data import DataLoader

from .augmentation import DeviceAugmenter, processor_crop_size
from .batching import ReportingImageBatcher, SkipCounter
from .datasets import FewShotData
from .decoded_cache import CachedImageDataset, DecodedImageCache, cache_size_for, collate_cached, decoded_cache_dir
from .loaders import EvalLoader, TrainLoader, default_num_workers, loader_kwargs


@dataclass(frozen=True)
class LoaderSpec:
    """How a run batches its images: the flags that decide it (named as they are) and the two facts of the machine
    the defaults depend on."""

    image_column: str
    label_column: str
    batch_size: int
    eval_batch_size: int
    augment: bool
    min_crop_scale: float
    seed: int  # of the crops: (seed, epoch, image) decides each one
    input_pipeline: Literal["auto", "pil", "decoded_cache"]
    dataloader_num_workers: int | None  # of the decoding loaders; None: up to 8 on CUDA, 0 on CPU
    validation: bool  # --eval_every: a validation loader for every task that has a validation split
    cuda: bool  # the device is a GPU: "auto" then decodes once, and decoding workers start by default
    processes: int = 1  # Accelerate's processes, which share the CPUs for workers

    @property
    def num_workers(self) -> int:
        """Worker processes of the decoding loaders (test, validation, cache build)."""
        if self.dataloader_num_workers is not None:
            return self.dataloader_num_workers
        return default_num_workers(self.processes) if self.cuda else 0

    @property
    def decoded_cache(self) -> bool:
        """Whether the training images are decoded once and cropped on the device."""
        return self.input_pipeline == "decoded_cache" or (self.input_pipeline == "auto" and self.cuda)


@dataclass
class RunLoaders:
    """A run's loaders by task. Every batch they yield is `{"pixel_values", "labels"}` (a training batch without any
    readable image is None); every unreadable image any of them meets is in `skips`, once."""

    train: dict[str, TrainLoader]
    val: dict[str, EvalLoader]  # empty without validation
    test: dict[str, EvalLoader]
    skips: SkipCounter
    generator: torch.Generator = field(default_factory=torch.Generator)  # shuffles every training loader

    def prepare(self, prepare: Callable[[DataLoader], Iterable]) -> None:
        """Hand every DataLoader to `prepare` (Accelerate's: sharding and device placement) inside its wrapper."""
        for loader in (*self.train.values(), *self.val.values(), *self.test.values()):
            loader.loader = prepare(loader.loader)


def build_loaders(
    tasks: Mapping[str, FewShotData],
    processor,
    spec: LoaderSpec,
    main_process_first: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> RunLoaders:
    """The loaders of `tasks`, whose images `processor` (the base model's) prepares. `main_process_first`: a context
    in which the main process builds a decoded cache before the others read it (`Accelerator.main_process_first`)."""
    loaders = RunLoaders({}, {}, {}, SkipCounter())
    # Both batchers report unreadable images in their batches, and the loaders count them in `skips`: those met in
    # DataLoader workers (whose own records die with them) as those met in the main process.
    train_batcher = ReportingImageBatcher(
        processor,
        spec.image_column,
        spec.label_column,
        train=spec.augment,
        seed=spec.seed,
        min_crop_scale=spec.min_crop_scale,
    )
    decoding = loader_kwargs(spec.num_workers, local_processes=spec.processes) if spec.num_workers else {}
    held_out = {
        "batch_size": spec.eval_batch_size,
        "collate_fn": ReportingImageBatcher(processor, spec.image_column, spec.label_column),
        **decoding,
    }
    for name, data in tasks.items():
        loaders.train[name] = _train_loader(data, processor, spec, train_batcher, loaders, main_process_first)
        loaders.test[name] = EvalLoader(DataLoader(data.test, **held_out), loaders.skips)
        if spec.validation and data.val is not None:
            loaders.val[name] = EvalLoader(DataLoader(data.val, **held_out), loaders.skips)
    return loaders


def _train_loader(
    data: FewShotData,
    processor,
    spec: LoaderSpec,
    batcher: ReportingImageBatcher,
    loaders: RunLoaders,
    main_process_first: Callable[[], AbstractContextManager],
) -> TrainLoader:
    """A task's shuffled training loader: over its decoded cache, cropped on the device by an augmenter, or (no
    cache asked for, or over the memory budget) over the images decoded and cropped by `batcher`."""
    cache = None
    if spec.decoded_cache:
        with main_process_first():  # the main process decodes, the others read its files
            size = cache_size_for(processor_crop_size(processor))
            cache = DecodedImageCache.build(
                data.train, spec.image_column, size, cache_dir=decoded_cache_dir(), num_workers=spec.num_workers
            )
    shuffled = {
        "batch_size": spec.batch_size,
        "shuffle": True,
        "generator": loaders.generator,
        "drop_last": len(data.train) >= spec.batch_size,  # as Dassl: the last partial batch, when there is a full one
    }
    if cache is None:
        return TrainLoader(DataLoader(data.train, collate_fn=batcher, **shuffled), batcher=batcher, skips=loaders.skips)
    loaders.skips.update(cache.skipped)
    samples = CachedImageDataset.from_dataset(cache, data.train, spec.label_column)
    augmenter = DeviceAugmenter.from_processor(
        processor, train=spec.augment, seed=spec.seed, min_scale=spec.min_crop_scale
    )
    return TrainLoader(DataLoader(samples, collate_fn=collate_cached, **shuffled), augmenter=augmenter)
