"""The training loop behind `accelerate launch examples/train.py`.

Every check that can fail (dataset, columns, labels, shots, output directory, checkpoint config) runs
before the first step, so a bad input never costs training time. Checkpoints hold the adapter (not the
frozen CLIP), the optimizer, scheduler and RNG states; each is written to a temporary directory and renamed
into place, so a run killed at any moment leaves only complete checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from peft import get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, CLIPModel

import dpt_peft  # noqa: F401  (registers DPT with PEFT)

from ..config import DPTConfig
from ..toy.pretrain import toy_clip_path
from .arguments import TrainArguments
from .data import ImageBatcher, check_columns, check_labels, few_shot_split, load_checked_split, undecoded, with_index
from ..prototypes import init_visual_prompts_from_prototypes
from .evaluation import accuracy_metrics, predict_split
from .plots import plot_training_curve

logger = logging.getLogger(__name__)
RUN_FILE = "run.json"
STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"


@dataclasses.dataclass
class FewShotData:
    train: object
    test: object
    class_names: list[str]


def load_data(args: TrainArguments, name: str) -> FewShotData:
    """One task's dataset, class names and few-shot split, with every check a user could fail."""
    dataset, pool, class_names = load_checked_split(
        name, args.train_split, args.image_column, args.label_column, args.class_names_file, args.seed,
        split_flag="--train_split",
    )
    train, rest = few_shot_split(pool, args.label_column, class_names, args.shots, args.seed)
    test = dataset[args.test_split] if args.test_split and args.test_split in dataset else rest
    check_columns(test, args.image_column, args.label_column)
    check_labels(test, args.label_column, class_names)
    return FewShotData(with_index(undecoded(train, args.image_column)), undecoded(test, args.image_column), class_names)


def load_tasks(args: TrainArguments) -> dict[str, FewShotData]:
    """Every task of the run, keyed by its dataset name."""
    names = args.datasets
    if len(set(names)) != len(names):
        raise ValueError(f"--tasks lists a dataset twice: {names}; give each task once.")
    return {name: load_data(args, name) for name in names}


def task_schedule(loaders: dict, sampling: str, generator: torch.Generator) -> list[str]:
    """The task of every step of one epoch: each task's batch count (proportional, shuffled), or a uniform draw."""
    names = list(loaders)
    total = sum(len(loader) for loader in loaders.values())
    if sampling == "uniform":
        return [names[i] for i in torch.randint(len(names), (total,), generator=generator).tolist()]
    order = [name for name in names for _ in range(len(loaders[name]))]
    return [order[i] for i in torch.randperm(total, generator=generator).tolist()]


def _normalized(value) -> object:
    return json.loads(json.dumps(value, default=str))


def _first_difference(old: dict, new: dict) -> str:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return "none"


def prepare_output_dir(args: TrainArguments, identity: dict, accelerator: Accelerator) -> None:
    """Refuse to mix two different runs in one directory (unless --overwrite_output_dir)."""
    output_dir = Path(args.output_dir)
    run_file = output_dir / RUN_FILE
    if args.resume_from_checkpoint:
        return  # the checkpoint's own run file is checked on resume
    if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite_output_dir:
        if not run_file.exists():
            raise ValueError(
                f"--output_dir {output_dir} is not empty and holds no dpt_peft run; choose another --output_dir or "
                "pass --overwrite_output_dir."
            )
        previous = json.loads(run_file.read_text())
        if previous != identity:
            raise ValueError(
                f"--output_dir {output_dir} holds a different run ({_first_difference(previous, identity)}); pass "
                "--overwrite_output_dir to replace it, --resume_from_checkpoint to continue it, or choose another "
                "--output_dir."
            )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if output_dir.exists() and (args.overwrite_output_dir or run_file.exists()):
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(identity, indent=2))
    accelerator.wait_for_everyone()


def recipe_lr_factor(base_lr: float, warmup_epochs: int, warmup_lr: float, epochs: int, steps_per_epoch: int):
    """Dassl's schedule, per epoch: constant `warmup_lr` for the warm-up epochs, then cosine over all epochs."""

    def factor(step: int) -> float:
        epoch = step // steps_per_epoch
        if epoch < warmup_epochs:
            return warmup_lr / base_lr
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))

    return factor


def build_optimizer(model, args: TrainArguments) -> torch.optim.SGD:
    """SGD with two groups: visual prompts + CAVPT (first), and the text context (METHOD.md section 4)."""
    text, visual = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (text if ".dpt_context." in name or name.endswith(".dpt_context") else visual).append(parameter)
    groups = [
        {"params": params, "lr": lr, "warmup_epochs": warmup}
        for params, lr, warmup in ((visual, args.visual_lr, args.visual_warmup_epochs),
                                   (text, args.text_lr, args.text_warmup_epochs))
        if params
    ]
    return torch.optim.SGD(groups, momentum=args.momentum, weight_decay=args.weight_decay)


def build_scheduler(optimizer: torch.optim.SGD, args: TrainArguments, steps_per_epoch: int):
    factors = [
        recipe_lr_factor(group["lr"], group["warmup_epochs"], args.warmup_lr, args.epochs, steps_per_epoch)
        for group in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def _register_adapter_only_checkpoints(accelerator: Accelerator) -> None:
    """Checkpoints store the adapter's tensors, not the frozen CLIP (hundreds of MB for ViT-B)."""

    def save(models, weights, output_dir):
        for model in models:
            accelerator.unwrap_model(model).save_pretrained(
                os.path.join(output_dir, "adapter"), is_main_process=accelerator.is_main_process
            )
        weights.clear()

    def load(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            weights = load_file(os.path.join(input_dir, "adapter", "adapter_model.safetensors"))
            set_peft_model_state_dict(model, weights)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def _checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINTS
    if not root.exists():
        return []
    return sorted((p for p in root.glob("epoch_*") if (p / STATE_FILE).exists()), key=lambda p: int(p.name[6:]))


def save_checkpoint(accelerator: Accelerator, args: TrainArguments, state: dict, identity: dict) -> None:
    output_dir = Path(args.output_dir)
    final = output_dir / CHECKPOINTS / f"epoch_{state['epoch']}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps({**state, "run": identity}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in _checkpoint_dirs(output_dir)[: -args.checkpoints_to_keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def resolve_checkpoint(args: TrainArguments) -> Path:
    if args.resume_from_checkpoint == "latest":
        found = _checkpoint_dirs(Path(args.output_dir))
        if not found:
            raise ValueError(f"--resume_from_checkpoint latest: no checkpoint in {Path(args.output_dir) / CHECKPOINTS}.")
        return found[-1]
    path = Path(args.resume_from_checkpoint)
    if not (path / STATE_FILE).exists():
        raise ValueError(f"--resume_from_checkpoint {path} is not a complete dpt_peft checkpoint (no {STATE_FILE}).")
    return path


def load_checkpoint_state(args: TrainArguments, identity: dict) -> tuple[Path, dict]:
    path = resolve_checkpoint(args)
    state = json.loads((path / STATE_FILE).read_text())
    if state["run"] != identity:
        raise ValueError(
            f"Checkpoint {path} was made with another config ({_first_difference(state['run'], identity)}); resume "
            "with the same arguments, or start a new run in another --output_dir."
        )
    return path, state


def _batches(loaders: dict, schedule: list[str]):
    """(task, batch) pairs following `schedule`; a task's loader restarts when it runs out."""
    iterators = {name: iter(loader) for name, loader in loaders.items()}
    for name in schedule:
        try:
            batch = next(iterators[name])
        except StopIteration:
            iterators[name] = iter(loaders[name])
            batch = next(iterators[name])
        yield name, batch


def _task_metrics(model, loader, accelerator: Accelerator, task: Optional[str], class_names: list[str]) -> dict:
    result = predict_split(model, loader, accelerator, task=task)
    trained = accuracy_metrics(result["predictions"], result["labels"], len(class_names))
    zero_shot = accuracy_metrics(result["zero_shot_predictions"], result["labels"], len(class_names))
    return {
        "zero_shot_accuracy": zero_shot["accuracy"],
        "accuracy": trained["accuracy"],
        "zero_shot_mean_per_class_accuracy": zero_shot["mean_per_class_accuracy"],
        "mean_per_class_accuracy": trained["mean_per_class_accuracy"],
        "per_class_accuracy": dict(zip(class_names, trained["per_class_accuracy"])),
        "num_test_images": int(len(result["labels"])),
    }


def train(args: TrainArguments, config_overrides: Optional[dict] = None) -> dict:
    """Train, evaluate, save (and push) a DPT adapter; returns the metrics written to metrics.json.

    With several tasks (`--tasks`), each batch comes from one task and is classified within that task's
    classes; metrics are reported per task and as their unweighted mean.
    """
    start = time.time()
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
        dynamo_backend="inductor" if args.torch_compile else "no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(args.seed)
    tasks = load_tasks(args)
    multitask = len(tasks) > 1
    class_names = {name: data.class_names for name, data in tasks.items()} if multitask else \
        next(iter(tasks.values())).class_names
    config = DPTConfig.for_method(args.method, class_names=class_names, **(config_overrides or {}))
    identity = _normalized(args.run_identity(config))
    checkpoint = None
    if args.resume_from_checkpoint:
        checkpoint, resumed = load_checkpoint_state(args, identity)
    prepare_output_dir(args, identity, accelerator)

    model_path = args.model_name_or_path or toy_clip_path()
    processor = AutoImageProcessor.from_pretrained(model_path)
    clip = CLIPModel.from_pretrained(model_path, attn_implementation=args.attn_implementation)
    if args.gradient_checkpointing:
        clip.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(clip, config)
    trainable = model.get_nb_trainable_parameters()[0]

    train_batcher = ImageBatcher(
        processor, args.image_column, args.label_column, train=args.augment, seed=args.seed,
        min_crop_scale=args.min_crop_scale,
    )
    test_batcher = ImageBatcher(processor, args.image_column, args.label_column)
    if config.visual_prompt_init == "prototype" and checkpoint is None:
        images = [DataLoader(data.train, batch_size=args.eval_batch_size, collate_fn=test_batcher)
                  for data in tasks.values()]
        init_visual_prompts_from_prototypes(
            model, (batch for loader in images for batch in loader), method=args.prototype_method,
            max_images=args.prototype_max_images, seed=args.seed,
        )
    generator = torch.Generator()
    train_loaders = {name: DataLoader(data.train, batch_size=args.batch_size, shuffle=True, generator=generator,
                                      collate_fn=train_batcher) for name, data in tasks.items()}
    test_loaders = {name: DataLoader(data.test, batch_size=args.eval_batch_size, collate_fn=test_batcher)
                    for name, data in tasks.items()}
    optimizer = build_optimizer(model, args)
    model, optimizer = accelerator.prepare(model, optimizer)
    train_loaders = {name: accelerator.prepare(loader) for name, loader in train_loaders.items()}
    test_loaders = {name: accelerator.prepare(loader) for name, loader in test_loaders.items()}
    # Stepped once per optimizer update by this loop (not prepared: Accelerate would step it once per process).
    steps_per_epoch = math.ceil(sum(len(loader) for loader in train_loaders.values()) / args.gradient_accumulation_steps)
    scheduler = build_scheduler(optimizer, args, steps_per_epoch)
    accelerator.register_for_checkpointing(scheduler)
    _register_adapter_only_checkpoints(accelerator)

    history: list[dict] = []
    start_epoch = global_step = 0
    train_seconds = 0.0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        start_epoch, global_step = resumed["epoch"] + 1, resumed["global_step"]
        history, train_seconds = resumed["history"], resumed["train_seconds"]
        accelerator.print(f"Resumed from {checkpoint} (epoch {resumed['epoch']} done)")
    if accelerator.log_with:
        accelerator.init_trackers("dpt_peft", config={k: str(v) for k, v in identity.items()})

    guidance_epochs = args.resolved_guidance_epochs
    progress = tqdm(total=steps_per_epoch * args.epochs, initial=global_step, desc="train",
                    disable=not accelerator.is_local_main_process)
    train_images = 0
    for epoch in range(start_epoch, args.epochs):
        epoch_start = time.time()
        generator.manual_seed(args.seed * 1_000_003 + epoch)
        schedule = task_schedule(train_loaders, args.task_sampling, torch.Generator().manual_seed(args.seed + epoch))
        train_batcher.epoch = epoch
        model.train()
        losses, correct, seen = [], 0, 0
        for task, batch in _batches(train_loaders, schedule):
            if batch is None:
                continue
            with accelerator.accumulate(model):
                output = model(**batch, task=task if multitask else None, guidance=epoch < guidance_epochs)
                accelerator.backward(output.loss)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                scheduler.step()
                global_step += 1
                progress.update(1)
            losses.append(output.loss.item())
            correct += (output.logits.argmax(-1) == batch["labels"]).sum().item()
            seen += len(batch["labels"])
        train_images += seen * accelerator.num_processes
        train_seconds += time.time() - epoch_start
        record = {"epoch": epoch, "step": global_step, "loss": sum(losses) / max(len(losses), 1),
                  "train_accuracy": correct / max(seen, 1), "guidance": epoch < guidance_epochs,
                  "lr": scheduler.get_last_lr()}
        history.append(record)
        accelerator.log({"train/loss": record["loss"], "train/accuracy": record["train_accuracy"]}, step=global_step)
        save_checkpoint(accelerator, args, {"epoch": epoch, "global_step": global_step, "history": history,
                                            "train_seconds": train_seconds}, identity)
    progress.close()

    per_task = {name: _task_metrics(model, test_loaders[name], accelerator, name if multitask else None,
                                    tasks[name].class_names) for name in tasks}
    skipped = train_batcher.skipped + test_batcher.skipped
    summary_keys = ("zero_shot_accuracy", "accuracy", "zero_shot_mean_per_class_accuracy", "mean_per_class_accuracy")
    metrics = {"method": args.method}
    if multitask:
        metrics.update({key: sum(m[key] for m in per_task.values()) / len(per_task) for key in summary_keys})
        metrics["tasks"] = per_task
        metrics["num_test_images"] = sum(m["num_test_images"] for m in per_task.values())
    else:
        metrics.update(next(iter(per_task.values())))
    metrics.update({
        "trainable_parameters": trainable,
        "num_train_images": sum(len(data.train) for data in tasks.values()),
        "skipped_images": len(skipped),
        "epochs": args.epochs,
        "steps": global_step,
        "train_seconds": train_seconds,
        "train_images_per_s": train_images / train_seconds if train_seconds else None,
        "wall_time_s": time.time() - start,
        "final_train_loss": history[-1]["loss"] if history else None,
    })
    if skipped:
        logger.warning("Skipped %d unreadable images: %s", len(skipped), skipped[:10])
    output_dir = Path(args.output_dir)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(output_dir / "adapter", is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (output_dir / "history.json").write_text(json.dumps(history, indent=2))
        plot_training_curve(history, str(output_dir / "training_curve.png"))
        accelerator.print(
            f"zero-shot accuracy {100 * metrics['zero_shot_accuracy']:.1f}%  ->  {args.method} accuracy "
            f"{100 * metrics['accuracy']:.1f}%  ({metrics['num_test_images']} test images"
            f"{f', mean of {len(tasks)} tasks' if multitask else ''}, {metrics['wall_time_s']:.0f}s)  written to "
            f"{output_dir}"
        )
        if args.push_to_hub:
            unwrapped.push_to_hub(args.hub_model_id)
    accelerator.end_training()
    return metrics
