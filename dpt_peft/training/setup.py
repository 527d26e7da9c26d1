"""Setting a training run up: data, model, optimizer, loaders and checkpoint state.

Every check that can fail (arguments, dataset, columns, labels, shots, output directory, checkpoint, base model
and DPT config) runs before anything is written to --output_dir, so a bad input never costs training time and a
corrected retry finds the directory as it was.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from peft import get_peft_model
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import DPTConfig
from ..data.augmentation import DeviceAugmenter, processor_crop_size
from ..data.batching import ImageBatcher, ReportingImageBatcher, SkipCounter
from ..data.coop_splits import save_split_file
from ..data.datasets import FewShotData, load_tasks
from ..data.decoded_cache import (
    CachedImageDataset,
    DecodedImageCache,
    cache_size_for,
    collate_cached,
    decoded_cache_dir,
)
from ..data.few_shot import data_fingerprint
from ..data.loaders import TrainLoader, default_num_workers, loader_kwargs
from ..prototypes import init_visual_prompts_from_prototypes
from ..sources import load_clip
from ..utils.write_policy import OutputFolder
from .arguments import TrainArguments
from .checkpoint_files import load_checkpoint_state
from .checkpoints import Checkpointer
from .recipe import build_optimizer, build_scheduler
from .run_dir import check_output_dir, check_run_flags, normalized, on_main_process, prepare_output_dir
from .run_layout import SPLITS_DIR, TRACKER_DIR
from .run_state import Run, RunState


def setup(args: TrainArguments, config_overrides: dict) -> Run:
    """Data, model, optimizer and checkpoint state. Every check runs before `prepare_output_dir` writes the first
    file (run.json), and a failure after it releases the directory's lock."""
    resume, overwrite = args.resume_from_checkpoint, args.overwrite_output_dir
    check_launcher()
    check_run_flags(args.output_dir, args.checkpoints_to_keep, overwrite, resume)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to in ([], ["none"]) else args.report_to,
        project_dir=args.output_dir,
        # None: the launcher's setting (accelerate launch flags, its config file), as for mixed_precision.
        dynamo_backend=None if args.torch_compile is None else ("inductor" if args.torch_compile else "no"),
        # Every prompt gets a gradient in a step of one task (checked for each method, with and without guidance);
        # a multitask step may leave another task's parameters unused.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=len(args.datasets) > 1)],
    )
    set_seed(args.seed)
    tasks = load_tasks(args.data_spec)
    missing_val = [name for name, data in tasks.items() if args.eval_every and data.val is None]
    if missing_val:
        raise ValueError(
            f"--eval_every needs a validation split, and {missing_val[0]} has none apart from its test split (which "
            "is never used for choices); train without --eval_every/--save_best."
        )
    config, identity = run_identity(args, config_overrides, tasks)
    # refusals before the model loads
    on_main_process(
        accelerator, lambda: check_output_dir(args.output_dir, identity, resume=bool(resume), overwrite=overwrite)
    )
    checkpoint = resumed = None
    if resume:  # verified (sha256) by every process, before anything is written
        checkpoint, resumed = load_checkpoint_state(resume, args.output_dir, identity)

    clip, processor = load_clip(args.model_name_or_path, attn_implementation=args.attn_implementation)
    if args.gradient_checkpointing:
        clip.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(clip, config)
    trainable = model.get_nb_trainable_parameters()[0]

    train_batcher = ImageBatcher(
        processor,
        args.image_column,
        args.label_column,
        train=args.augment,
        seed=args.seed,
        min_crop_scale=args.min_crop_scale,
    )
    test_batcher = plain_batcher = ImageBatcher(processor, args.image_column, args.label_column)
    cuda = accelerator.device.type == "cuda"
    workers = args.dataloader_num_workers
    workers = (default_num_workers(accelerator.num_processes) if cuda else 0) if workers is None else workers
    if workers:  # batches carry their skipped images to the main process, which counts each once
        test_batcher = ReportingImageBatcher(processor, args.image_column, args.label_column)
    decoding = loader_kwargs(workers, local_processes=accelerator.num_processes) if workers else {}
    use_cache = args.input_pipeline == "decoded_cache" or (args.input_pipeline == "auto" and cuda)
    if config.visual_prompt_init == "prototype" and checkpoint is None:
        loaders = [
            DataLoader(d.train, batch_size=args.eval_batch_size, collate_fn=plain_batcher) for d in tasks.values()
        ]
        init_visual_prompts_from_prototypes(
            model,
            (batch for loader in loaders for batch in loader),
            method=args.prototype_method,
            max_images=args.prototype_max_images,
            seed=args.seed,
        )
    recipe = args.recipe
    optimizer = build_optimizer(model, recipe)

    lock = prepare_output_dir(args.output_dir, identity, accelerator, resume=bool(resume), overwrite=overwrite)
    try:
        if accelerator.is_main_process:
            write_split_files(args, tasks)
        generator = torch.Generator()
        skips = SkipCounter()
        train_loaders: dict[str, DataLoader] = {}
        augmenters: dict[str, DeviceAugmenter] = {}
        for name, data in tasks.items():
            cache = None
            if use_cache:
                with accelerator.main_process_first():  # the main process decodes, the others read its files
                    size = cache_size_for(processor_crop_size(processor))
                    cache = DecodedImageCache.build(
                        data.train, args.image_column, size, cache_dir=decoded_cache_dir(), num_workers=workers
                    )
            if cache is not None:
                skips.update(cache.skipped)
                augmenters[name] = DeviceAugmenter.from_processor(
                    processor, train=args.augment, seed=args.seed, min_scale=args.min_crop_scale
                )
            source = (
                data.train if cache is None else CachedImageDataset.from_dataset(cache, data.train, args.label_column)
            )
            train_loaders[name] = DataLoader(  # Dassl drops the last partial batch when there is a full one
                source,
                batch_size=args.batch_size,
                shuffle=True,
                generator=generator,
                collate_fn=train_batcher if cache is None else collate_cached,
                drop_last=len(data.train) >= args.batch_size,
            )
        test_loaders = {
            name: DataLoader(data.test, batch_size=args.eval_batch_size, collate_fn=test_batcher, **decoding)
            for name, data in tasks.items()
        }
        val_loaders = {
            name: DataLoader(data.val, batch_size=args.eval_batch_size, collate_fn=test_batcher, **decoding)
            for name, data in tasks.items()
            if args.eval_every and data.val is not None
        }
        model, optimizer = accelerator.prepare(model, optimizer)
        augmenting = {
            name: TrainLoader(accelerator.prepare(loader), augmenter=augmenters[name])
            if name in augmenters
            else TrainLoader(accelerator.prepare(loader), batcher=train_batcher)
            for name, loader in train_loaders.items()
        }
        test_loaders = {name: accelerator.prepare(loader) for name, loader in test_loaders.items()}
        val_loaders = {name: accelerator.prepare(loader) for name, loader in val_loaders.items()}
        # Stepped once per optimizer update by the loop (not prepared: Accelerate would step it once per process).
        batches_per_epoch = sum(len(loader) for loader in augmenting.values())
        steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
        scheduler = build_scheduler(optimizer, recipe, steps_per_epoch)
        checkpointer = Checkpointer(
            accelerator, model, optimizer, scheduler, generator, args.output_dir, args.checkpoints_to_keep
        )

        state = RunState()
        if checkpoint is not None:
            checkpointer.restore(checkpoint)
            state = RunState.from_dict(resumed)
            accelerator.print(f"Resumed from {checkpoint.path} (epoch {resumed['epoch']} done)")
        if accelerator.log_with:
            if accelerator.is_main_process:  # the tracker's logs grow as it runs: the folder is recorded as ours
                OutputFolder(args.output_dir).record_dir(TRACKER_DIR)
            accelerator.init_trackers(TRACKER_DIR, config={k: str(v) for k, v in identity.items()})
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    progress = tqdm(
        total=steps_per_epoch * args.epochs,
        initial=state.global_step,
        desc="train",
        disable=not accelerator.is_local_main_process,
    )
    return Run(
        args,
        recipe,
        accelerator,
        tasks,
        model,
        optimizer,
        scheduler,
        augmenting,
        test_loaders,
        val_loaders,
        skips,
        (train_batcher, test_batcher),
        generator,
        checkpointer,
        identity,
        steps_per_epoch,
        trainable,
        state,
        progress,
        lock,
    )


def run_identity(args: TrainArguments, config_overrides: dict, tasks: dict[str, FewShotData]) -> tuple[DPTConfig, dict]:
    """The run's DPTConfig and identity (its arguments, config and data fingerprint, as run.json records them)."""
    class_names = {name: data.class_names for name, data in tasks.items()} if len(tasks) > 1 else None
    class_names = class_names or next(iter(tasks.values())).class_names
    config = DPTConfig.for_method(args.method, class_names=class_names, **config_overrides)
    identity = {
        **args.run_identity(config),
        "data_fingerprint": data_fingerprint(tasks, args.image_column, args.label_column),
    }
    return config, normalized(identity)


def check_launcher() -> None:
    """FSDP and DeepSpeed are refused before anything is built: the frozen CLIP is replicated on each process and
    only the prompts (a few MB) train, so DDP (`accelerate launch --multi_gpu`) is what a run needs; sharding would
    matter only for a base too large for one device (README, "Distributed training")."""
    for variable, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(variable, "").lower() in ("1", "true", "yes"):
            raise ValueError(
                f"{name} is not supported by dpt-peft train (the launcher set {variable}): the base CLIP is frozen and "
                "only a few MB of prompts train, so run data-parallel instead: `accelerate launch --multi_gpu "
                "--num_processes N -m dpt_peft train ...` (or `accelerate config` without FSDP/DeepSpeed)."
            )


def write_split_files(args: TrainArguments, tasks: dict[str, FewShotData]) -> None:
    """The few-shot images of each benchmark task as JSON (`--split_file` reuses one on another machine)."""
    for name, data in tasks.items():
        if data.split_indices is not None:
            path = Path(args.output_dir) / SPLITS_DIR / f"{name}.json"
            save_split_file(path, data.split_source, data.split_indices, shots=args.shots, seed=args.seed)
            OutputFolder(args.output_dir).record([f"{SPLITS_DIR}/{name}.json"])
