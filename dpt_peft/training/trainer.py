"""The training loop behind `dpt-peft train` and `accelerate launch examples/train.py`: setup, the epochs, report.

A non-finite loss or prompt parameter stops the run before the epoch is saved (docs/reliability.md).
"""

from __future__ import annotations

import logging
import math
import time

import torch

from ..data.loaders import scheduled_batches, task_schedule
from ..utils.seeding import seed_for
from .arguments import TrainArguments
from .report import report, validate
from .run_layout import checkpoint_dirs
from .run_state import Run
from .setup import setup

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss or a prompt parameter became NaN or infinite; nothing of that epoch is saved."""


def train(args: TrainArguments, config_overrides: dict | None = None) -> dict:
    """Train, evaluate, save (and push) a DPT adapter; returns the metrics written to metrics.json.

    `config_overrides`: DPTConfig values over the --method preset (`TrainArguments.config_overrides` adds the
    dataset's). With several tasks (`--tasks`), each batch comes from one task and is classified within that task's
    classes; metrics are reported per task and as their unweighted mean.
    """
    start = time.time()
    run = setup(args, config_overrides or {})
    try:
        for epoch in range(run.state.epochs_done, args.epochs):
            train_epoch(run, epoch)
        return report(run, time.time() - start)
    finally:
        run.run_dir.release()


def train_epoch(run: Run, epoch: int) -> None:
    """One epoch over every task's few-shot set, then a checkpoint."""
    args, accelerator, state = run.args, run.accelerator, run.state
    epoch_start = time.time()
    guidance = run.recipe.guidance(epoch)
    run.loaders.generator.manual_seed(seed_for(args.seed, "loader_shuffle", epoch))
    task_draws = torch.Generator().manual_seed(seed_for(args.seed, "task_schedule", epoch))
    schedule = task_schedule(run.loaders.train, args.task_sampling, task_draws)
    for loader in run.loaders.train.values():
        loader.set_epoch(epoch)
    run.model.train()
    losses, grad_norms, correct, seen = [], [], 0, 0
    for task, batch in scheduled_batches(run.loaders.train, schedule):
        if batch is None:  # no image of it was readable
            continue
        with accelerator.accumulate(run.model):
            output = run.model(**batch, task=task if run.multitask else None, guidance=guidance)
            check_loss(run, output.loss, epoch, state.global_step + 1)  # before the update it would poison
            accelerator.backward(output.loss)
            if accelerator.sync_gradients:  # the norm of the update's gradient (unscaled under fp16), not clipped
                grad_norms.append(float(accelerator.clip_grad_norm_(run.model.parameters(), math.inf)))
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
    if grad_norms:
        logged["train/grad_norm"] = sum(grad_norms) / len(grad_norms)
    for group, lr in zip(run.optimizer.param_groups, record["lr"]):
        logged[f"train/lr_{group.get('name', len(logged))}"] = lr
    if args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
        record["val_accuracy"] = validate(run, epoch)
        logged["val/accuracy"] = record["val_accuracy"]
    state.history.append(record)
    accelerator.log(logged, step=state.global_step)
    logger.info("epoch %d: %s", epoch, {k: v for k, v in record.items() if k != "lr"})
    state.epochs_done = epoch + 1
    run.checkpointer.save(state.to_dict(), run.identity)


def _last_checkpoint(run: Run) -> str:
    found = checkpoint_dirs(run.run_dir.path)
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
    for key, (_, parameter) in unwrapped.adapter_parameters().items():
        if not bool(torch.isfinite(parameter.detach()).all()):
            raise TrainingDivergedError(
                f"Training diverged: prompt parameter {key} became NaN or infinite in epoch {epoch} (0-based), by "
                f"optimizer step {run.state.global_step} at the latest. The run stopped without saving this epoch; "
                f"{_last_checkpoint(run)}. Lower the learning rates (--visual_lr {run.args.visual_lr}, --text_lr "
                f"{run.args.text_lr}) and train again in a new --output_dir (or with --overwrite_output_dir)."
            )
