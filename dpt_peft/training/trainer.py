"""The training loop behind `accelerate launch examples/train.py`: setup, loop, report.

Every check that can fail (arguments, dataset, columns, labels, shots, output directory, checkpoint, base model
and DPT config) runs before anything is written to --output_dir, so a bad input never costs training time and a
corrected retry finds the directory as it was. A non-finite loss stops the run (docs/reliability.md).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from peft import get_peft_model
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import DPTConfig
from ..data.catalog import save_split_file
from ..data.datasets import FewShotData, ImageBatcher, load_tasks, scheduled_batches, task_schedule
from ..data.input_pipeline import (
    CachedImageDataset,
    DecodedImageCache,
    DeviceAugmenter,
    ReportingImageBatcher,
    SkipCounter,
    cache_size_for,
    collate_cached,
    default_cache_dir,
    default_num_workers,
    loader_kwargs,
    processor_crop_size,
)
from ..model_card import ModelCardInfo
from ..prototypes import init_visual_prompts_from_prototypes
from ..sources import load_clip
from ..utils.plots import plot_training_curve
from .arguments import TrainArguments
from .checkpoints import checkpoint_dirs, load_checkpoint, load_checkpoint_state, register_checkpointed, save_checkpoint
from .evaluation import split_metrics
from .recipe import build_optimizer, build_scheduler
from .run_dir import (
    TRACKER_DIR,
    RunLock,
    check_arguments,
    check_output_dir,
    normalized,
    on_main_process,
    prepare_output_dir,
)

logger = logging.getLogger(__name__)
SPLITS = "splits"
SUMMARY_KEYS = ("zero_shot_accuracy", "accuracy", "zero_shot_mean_per_class_accuracy", "mean_per_class_accuracy")


class TrainingDivergedError(RuntimeError):
    """The loss or a prompt parameter became NaN or infinite; nothing of that epoch is saved."""


@dataclass
class RunState:
    """What a checkpoint restores: where the loop is and what it has recorded so far."""

    start_epoch: int = 0
    global_step: int = 0
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    train_images: int = 0
    best_val_accuracy: float | None = None
    best_epoch: int | None = None


@dataclass
class Run:
    """Everything the loop works with, made by `setup`."""

    args: TrainArguments
    accelerator: Accelerator
    tasks: dict[str, FewShotData]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loaders: dict[str, DataLoader]
    test_loaders: dict[str, DataLoader]
    val_loaders: dict[str, DataLoader]  # empty without --eval_every
    augmenter: DeviceAugmenter | None  # training batches decoded once (--input_pipeline decoded_cache)
    skips: SkipCounter  # unreadable images met by the decoding loaders' workers and the cache
    batchers: tuple[ImageBatcher, ImageBatcher]  # train, test
    generator: torch.Generator
    identity: dict
    steps_per_epoch: int
    trainable_parameters: int
    state: RunState
    progress: tqdm
    lock: RunLock | None = None  # of --output_dir, held by the main process
    frozen_val_features: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # per task, per batch

    @property
    def multitask(self) -> bool:
        return len(self.tasks) > 1


def train(args: TrainArguments, config_overrides: dict | None = None) -> dict:
    """Train, evaluate, save (and push) a DPT adapter; returns the metrics written to metrics.json.

    With several tasks (`--tasks`), each batch comes from one task and is classified within that task's
    classes; metrics are reported per task and as their unweighted mean.
    """
    start = time.time()
    run = setup(args, config_overrides or {})
    try:
        for epoch in range(run.state.start_epoch, args.epochs):
            train_epoch(run, epoch)
        return report(run, time.time() - start)
    finally:
        if run.lock is not None:
            run.lock.release()


def setup(args: TrainArguments, config_overrides: dict) -> Run:
    """Data, model, optimizer and checkpoint state. Every check runs before `prepare_output_dir` writes the first
    file (run.json), and a failure after it releases the directory's lock."""
    check_arguments(args)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
        # None: the launcher's setting (accelerate launch flags, its config file), as for mixed_precision.
        dynamo_backend=None if args.torch_compile is None else ("inductor" if args.torch_compile else "no"),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(args.seed)
    tasks = load_tasks(args)
    missing_val = [name for name, data in tasks.items() if args.eval_every and data.val is None]
    if missing_val:
        raise ValueError(
            f"--eval_every needs a validation split, and {missing_val[0]} has none apart from its test split (which "
            "is never used for choices); train without --eval_every/--save_best."
        )
    class_names = {name: data.class_names for name, data in tasks.items()} if len(tasks) > 1 else None
    class_names = class_names or next(iter(tasks.values())).class_names
    config = DPTConfig.for_method(args.method, class_names=class_names, **config_overrides)
    identity = normalized(args.run_identity(config))
    on_main_process(accelerator, lambda: check_output_dir(args, identity))  # refusals before the model loads
    checkpoint = resumed = None
    if args.resume_from_checkpoint:  # verified (sha256) by every process, before anything is written
        checkpoint, resumed = load_checkpoint_state(args, identity)

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
    optimizer = build_optimizer(model, args)

    lock = prepare_output_dir(args, identity, accelerator)  # the first write
    try:
        if accelerator.is_main_process:
            write_split_files(args, tasks)
        generator = torch.Generator()
        skips = SkipCounter()
        augmenter = None
        train_loaders = {}
        for name, data in tasks.items():
            cache = None
            if use_cache:
                with accelerator.main_process_first():  # the main process decodes, the others read its files
                    size = cache_size_for(processor_crop_size(processor))
                    cache = DecodedImageCache.build(
                        data.train, args.image_column, size, cache_dir=default_cache_dir(), num_workers=workers
                    )
            if cache is not None:
                skips.update(cache.skipped)
                augmenter = DeviceAugmenter.from_processor(
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
        train_loaders = {name: accelerator.prepare(loader) for name, loader in train_loaders.items()}
        test_loaders = {name: accelerator.prepare(loader) for name, loader in test_loaders.items()}
        val_loaders = {name: accelerator.prepare(loader) for name, loader in val_loaders.items()}
        # Stepped once per optimizer update by the loop (not prepared: Accelerate would step it once per process).
        batches_per_epoch = sum(len(loader) for loader in train_loaders.values())
        steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
        scheduler = build_scheduler(optimizer, args, steps_per_epoch)
        register_checkpointed(accelerator, model, optimizer, scheduler, generator)

        state = RunState()
        if checkpoint is not None:
            load_checkpoint(accelerator, checkpoint)
            state = RunState(
                resumed["epoch"] + 1,
                resumed["global_step"],
                resumed["history"],
                resumed["train_seconds"],
                resumed.get("train_images", 0),
                resumed.get("best_val_accuracy"),
                resumed.get("best_epoch"),
            )
            accelerator.print(f"Resumed from {checkpoint.path} (epoch {resumed['epoch']} done)")
        if accelerator.log_with:
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
        accelerator,
        tasks,
        model,
        optimizer,
        scheduler,
        train_loaders,
        test_loaders,
        val_loaders,
        augmenter,
        skips,
        (train_batcher, test_batcher),
        generator,
        identity,
        steps_per_epoch,
        trainable,
        state,
        progress,
        lock,
    )


def write_split_files(args: TrainArguments, tasks: dict[str, FewShotData]) -> None:
    """The few-shot images of each benchmark task as JSON (`--split_file` reuses one on another machine)."""
    for name, data in tasks.items():
        if data.split_indices is not None:
            path = Path(args.output_dir) / SPLITS / f"{name}.json"
            save_split_file(path, data.split_source, data.split_indices, shots=args.shots, seed=args.seed)


def train_epoch(run: Run, epoch: int) -> None:
    """One epoch over every task's few-shot set, then a checkpoint."""
    args, accelerator, state = run.args, run.accelerator, run.state
    epoch_start = time.time()
    guidance = epoch < args.resolved_guidance_epochs
    run.generator.manual_seed(args.seed * 1_000_003 + epoch)
    schedule = task_schedule(run.train_loaders, args.task_sampling, torch.Generator().manual_seed(args.seed + epoch))
    run.batchers[0].epoch = epoch
    run.model.train()
    losses, correct, seen = [], 0, 0
    for task, batch in scheduled_batches(run.train_loaders, schedule):
        if batch is None:
            continue
        if "images" in batch:  # decoded once: crop, flip and normalize on the device
            batch = {"pixel_values": run.augmenter(batch["images"], epoch, batch["indices"]), "labels": batch["labels"]}
        with accelerator.accumulate(run.model):
            output = run.model(**batch, task=task if run.multitask else None, guidance=guidance)
            check_loss(run, output.loss, epoch, state.global_step + 1)  # before the update it would poison
            accelerator.backward(output.loss)
            run.optimizer.step()
            run.optimizer.zero_grad()
        if accelerator.sync_gradients:
            run.scheduler.step()
            state.global_step += 1
            run.progress.update(1)
        losses.append(output.loss.item())
        correct += (output.logits.argmax(-1) == batch["labels"]).sum().item()
        seen += len(batch["labels"])
        run.progress.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}", acc=f"{correct / seen:.2f}", refresh=False)
    check_parameters(run, epoch)
    state.train_images += seen * accelerator.num_processes
    state.train_seconds += time.time() - epoch_start
    record = {
        "epoch": epoch,
        "step": state.global_step,
        "loss": sum(losses) / max(len(losses), 1),
        "train_accuracy": correct / max(seen, 1),
        "guidance": guidance,
        "lr": run.scheduler.get_last_lr(),
    }
    logged = {"train/loss": record["loss"], "train/accuracy": record["train_accuracy"]}
    if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
        record["val_accuracy"] = validate(run, epoch)
        logged["val/accuracy"] = record["val_accuracy"]
    state.history.append(record)
    accelerator.log(logged, step=state.global_step)
    logger.info("epoch %d: %s", epoch, {k: v for k, v in record.items() if k != "lr"})
    checkpoint_state = {
        "epoch": epoch,
        "global_step": state.global_step,
        "history": state.history,
        "train_seconds": state.train_seconds,
        "train_images": state.train_images,
        "best_val_accuracy": state.best_val_accuracy,
        "best_epoch": state.best_epoch,
    }
    save_checkpoint(accelerator, args, checkpoint_state, run.identity)


def validate(run: Run, epoch: int) -> float:
    """Mean accuracy over the tasks' few-shot validation splits; with --save_best, keep the best epoch's adapter.

    The frozen CLIP's image features of the validation images are computed at the first validation and reused.
    """
    accuracies = [
        split_metrics(
            run.model,
            loader,
            run.accelerator,
            run.tasks[name].class_names,
            name if run.multitask else None,
            run.frozen_val_features.setdefault(name, {}),
            run.skips,
        )["accuracy"]
        for name, loader in run.val_loaders.items()
    ]
    accuracy = sum(accuracies) / len(accuracies)
    state = run.state
    if state.best_val_accuracy is None or accuracy > state.best_val_accuracy:
        state.best_val_accuracy, state.best_epoch = accuracy, epoch
        if run.args.save_best:
            unwrapped = run.accelerator.unwrap_model(run.model)
            best = Path(run.args.output_dir) / "best_adapter"
            unwrapped.save_pretrained(best, is_main_process=run.accelerator.is_main_process)
    return accuracy


def _last_checkpoint(run: Run) -> str:
    found = checkpoint_dirs(Path(run.args.output_dir))
    return f"the last checkpoint, {found[-1]}, is kept" if found else "no checkpoint had been written yet"


def check_loss(run: Run, loss: torch.Tensor, epoch: int, step: int) -> None:
    """Stop on a NaN or infinite loss (of any process), before backward: nothing of this epoch is saved."""
    losses = loss.detach().float().reshape(1)
    if run.accelerator.num_processes > 1:
        losses = run.accelerator.gather(losses)  # every process stops at the same step
    finite = torch.isfinite(losses)
    if bool(finite.all()):
        return
    value = losses[~finite][0].item()
    raise TrainingDivergedError(
        f"Training diverged: the loss is {value} in epoch {epoch} (0-based, as in history.json), optimizer step "
        f"{step}. The run stopped without saving this epoch; {_last_checkpoint(run)}. Lower the learning rates "
        f"(--visual_lr {run.args.visual_lr}, --text_lr {run.args.text_lr}) and train again in a new --output_dir "
        "(or with --overwrite_output_dir)."
    )


def check_parameters(run: Run, epoch: int) -> None:
    """Stop when an update made a prompt parameter NaN or infinite (the loss was still finite)."""
    unwrapped = run.accelerator.unwrap_model(run.model)
    for key, (_, parameter) in unwrapped.base_model.adapter_parameters().items():
        if not bool(torch.isfinite(parameter.detach()).all()):
            raise TrainingDivergedError(
                f"Training diverged: prompt parameter {key} became NaN or infinite in epoch {epoch} (0-based), by "
                f"optimizer step {run.state.global_step} at the latest. The run stopped without saving this epoch; "
                f"{_last_checkpoint(run)}. Lower the learning rates (--visual_lr {run.args.visual_lr}, --text_lr "
                f"{run.args.text_lr}) and train again in a new --output_dir (or with --overwrite_output_dir)."
            )


def report(run: Run, wall_time: float) -> dict:
    """Evaluate every task on its held-out set; write the adapter, metrics.json, history.json and the curve."""
    args, accelerator, state = run.args, run.accelerator, run.state
    run.progress.close()
    per_task = {
        name: split_metrics(
            run.model,
            run.test_loaders[name],
            accelerator,
            run.tasks[name].class_names,
            name if run.multitask else None,
            skips=run.skips,
        )
        for name in run.tasks
    }
    run.skips.update(run.batchers[0].skipped + run.batchers[1].skipped)
    skipped = run.skips.skipped
    metrics: dict = {"method": args.method}
    if run.multitask:
        metrics.update({key: sum(m[key] for m in per_task.values()) / len(per_task) for key in SUMMARY_KEYS})
        metrics["tasks"] = per_task
        metrics["num_test_images"] = sum(m["num_test_images"] for m in per_task.values())
    else:
        metrics.update(next(iter(per_task.values())))
    metrics.update(
        {
            "trainable_parameters": run.trainable_parameters,
            "num_train_images": sum(len(data.train) for data in run.tasks.values()),
            "skipped_images": len(skipped),
            "epochs": args.epochs,
            "steps": state.global_step,
            "train_seconds": state.train_seconds,
            "train_images_per_s": state.train_images / state.train_seconds if state.train_images else None,
            "wall_time_s": wall_time,
            "final_train_loss": state.history[-1]["loss"] if state.history else None,
            "mixed_precision": accelerator.mixed_precision,
            "input_pipeline": "decoded_cache" if run.augmenter is not None else "pil",
            "best_epoch": state.best_epoch,
            "best_val_accuracy": state.best_val_accuracy,
        }
    )
    if skipped:
        logger.warning("Skipped %d unreadable images: %s", len(skipped), skipped[:10])
    output_dir = Path(args.output_dir)
    unwrapped = accelerator.unwrap_model(run.model)
    unwrapped.card_info = ModelCardInfo(args.base_model_id, ",".join(args.datasets), args.shots, metrics)
    unwrapped.save_pretrained(output_dir / "adapter", is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (output_dir / "history.json").write_text(json.dumps(state.history, indent=2))
        plot_training_curve(state.history, str(output_dir / "training_curve.png"))
        accelerator.print(
            f"zero-shot accuracy {100 * metrics['zero_shot_accuracy']:.1f}%  ->  {args.method} accuracy "
            f"{100 * metrics['accuracy']:.1f}%  ({metrics['num_test_images']} test images"
            f"{f', mean of {len(run.tasks)} tasks' if run.multitask else ''}, {wall_time:.0f}s)  written to "
            f"{output_dir}"
        )
        if args.push_to_hub:
            unwrapped.push_to_hub(args.hub_model_id)
    accelerator.end_training()
    return metrics
