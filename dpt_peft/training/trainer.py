"""The training loop behind `dpt-peft train` and `accelerate launch examples/train.py`: setup, the epochs, report.

A non-finite loss or prompt parameter stops the run before the epoch is saved (docs/reliability.md).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from huggingface_hub import HfApi, get_token
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError

from ..data.loaders import scheduled_batches, task_schedule
from ..utils.errors import UserInputError
from ..utils.seeding import seed_for
from .arguments import TrainArguments
from .checkpoint_files import CheckpointError
from .linear_probe import METHOD as METHOD_LINEAR_PROBE
from .linear_probe import train_linear_probe
from .prompt_averaging import PromptAverage, epoch_weights
from .report import report, validate
from .run_layout import ADAPTER_DIR, PROMPT_AVERAGE_TENSORS, checkpoint_dirs
from .run_state import Run
from .setup import setup

logger = logging.getLogger(__name__)
# What a Hub call raises when the network, the token or the server fails: HfHubHTTPError's bases are the HTTP client's
# base error (httpx's) and OSError, which also covers huggingface_hub's OfflineModeIsEnabled and connection errors.
HUB_ERRORS = (HfHubHTTPError, *HfHubHTTPError.__bases__)


class TrainingDivergedError(RuntimeError):
    """The loss or a prompt parameter became NaN or infinite; nothing of that epoch is saved."""


def train(args: TrainArguments, config_overrides: dict | None = None) -> dict:
    """Train, evaluate, save (and push) a DPT adapter; returns the metrics written to metrics.json.

    `config_overrides`: DPTConfig values over the --method preset; a shipped model's own settings (the toy CLIP's 4
    context tokens) and a CoOp dataset's template are added unless given (`TrainArguments.config_overrides`), so a
    Python call trains as the command does. With several tasks (`--tasks`), each batch comes from one task and is
    classified within that task's classes; metrics are reported per task and as their unweighted mean.
    """
    if args.method == METHOD_LINEAR_PROBE:  # no prompts and no loop: fitted on frozen features (linear_probe.py)
        return train_linear_probe(args, args.config_overrides(config_overrides or {}))
    start = time.time()
    if args.push_to_hub:
        check_push_target(args.hub_repo_id)
    run = setup(args, args.config_overrides(config_overrides or {}))  # idempotent: the CLI's are already applied
    try:
        run.prompt_average = run.checkpointer.prompt_average = start_prompt_average(run)
        for epoch in range(run.state.epochs_done, args.epochs):
            train_epoch(run, epoch)
        metrics = report(run, time.time() - start)
        if args.push_to_hub and run.accelerator.is_main_process:
            push_adapter(run.accelerator.unwrap_model(run.model), args.hub_repo_id, run.run_dir.path / ADAPTER_DIR)
        return metrics
    finally:
        run.run_dir.release()


def check_push_target(repo_id: str) -> None:
    """--push_to_hub checked before any work, as transformers' Trainer does (it creates the repo at init): not in
    offline mode, a token present, and the repo created (or found) on the Hub, which also proves it reachable."""
    if hf_constants.is_offline_mode():
        raise UserInputError(
            f"--push_to_hub cannot push to {repo_id!r} with HF_HUB_OFFLINE set (offline mode); unset it, or drop "
            "--push_to_hub (the adapter is saved in --output_dir either way)."
        )
    if get_token() is None:
        raise UserInputError(
            "--push_to_hub needs a Hub token with write access: run `hf auth login` (or set HF_TOKEN) first, or drop "
            "--push_to_hub."
        )
    try:
        HfApi().create_repo(repo_id, exist_ok=True)
    except HUB_ERRORS as err:
        raise UserInputError(
            f"--push_to_hub: the Hub repo {repo_id!r} could not be created or reached before training "
            f"({_one_line(err)}); check the network and the token's write access, or drop --push_to_hub."
        ) from err


def push_adapter(model: torch.nn.Module, repo_id: str, saved: Path) -> None:
    """Push the final adapter; a failure is one line saying where the adapter is and how to push it later."""
    try:
        model.push_to_hub(repo_id)
    except HUB_ERRORS as err:
        raise UserInputError(
            f"Training finished, but pushing the adapter to {repo_id!r} failed ({_one_line(err)}). The adapter is "
            f"saved in {saved}; push it later with `hf upload {repo_id} {saved}`."
        ) from err
    logger.warning("Pushed the adapter to https://huggingface.co/%s", repo_id)


def start_prompt_average(run: Run) -> PromptAverage | None:
    """--prompt_averaging gaussian: an empty running average, or the one the resumed checkpoint holds."""
    args = run.args
    if args.prompt_averaging != "gaussian":
        return None
    weights = epoch_weights(args.epochs, args.prompt_averaging_mean, args.prompt_averaging_std)
    if run.state.epochs_done == 0:
        return PromptAverage(weights)
    saved = run.checkpointer.restored_prompt_average
    if saved is None:
        raise CheckpointError(
            f"The checkpoint of epoch {run.state.epochs_done - 1} holds no prompt average ({PROMPT_AVERAGE_TENSORS}); "
            "resume with the arguments of the run that wrote it."
        )
    return PromptAverage.from_tensors(weights, saved)


def _one_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


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
    term_sums: dict[str, float] = {}  # the named parts of the loss (DPTOutput.loss_terms), summed over batches
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
        for key, term in (getattr(output, "loss_terms", None) or {}).items():
            term_sums[key] = term_sums.get(key, 0.0) + float(term.detach())
        correct += (output.logits.argmax(-1) == batch["labels"]).sum().item()
        seen += len(batch["labels"])
        run.progress.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}", acc=f"{correct / seen:.2f}", refresh=False)
    check_parameters(run, epoch)
    if run.prompt_average is not None:  # after the epoch's last update, as PromptSRC
        parameters = accelerator.unwrap_model(run.model).adapter_parameters()
        run.prompt_average.add(epoch, {key: parameter for key, (_, parameter) in parameters.items()})
    loss_terms = epoch_loss_terms(accelerator, term_sums, len(losses))
    loss_sum, batches, correct, seen = epoch_totals(accelerator, sum(losses), len(losses), correct, seen)
    state.train_images += seen
    state.train_seconds += time.time() - epoch_start
    record = {
        "epoch": epoch,
        "step": state.global_step,
        "loss": loss_sum / max(batches, 1),
        "train_accuracy": correct / max(seen, 1),
        "guidance": guidance,
        "lr": run.scheduler.get_last_lr(),
    }
    if loss_terms:
        record["loss_terms"] = loss_terms
    logged = {"train/loss": record["loss"], "train/accuracy": record["train_accuracy"]}
    logged.update({f"train/{key}": value for key, value in loss_terms.items()})
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


def epoch_totals(accelerator, loss_sum: float, batches: int, correct: int, seen: int) -> tuple[float, int, int, int]:
    """An epoch's summed batch losses, batches, correct predictions and images over every process (DDP), so that
    history.json and `final_train_loss` are the run's mean, as accuracy is, not the main process's."""
    totals = torch.tensor([loss_sum, batches, correct, seen], dtype=torch.float32, device=accelerator.device)
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    loss_sum, batches, correct, seen = totals.tolist()
    return loss_sum, int(batches), int(correct), int(seen)


def epoch_loss_terms(accelerator, sums: dict[str, float], batches: int) -> dict[str, float]:
    """Each named part of the loss, averaged over the epoch's batches of every process (as the loss); none when the
    model reports none. The keys are the config's, the same on every process."""
    if not sums:
        return {}
    keys = sorted(sums)
    totals = torch.tensor([*(sums[key] for key in keys), batches], dtype=torch.float32, device=accelerator.device)
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    *values, count = totals.tolist()
    return {key: value / max(count, 1) for key, value in zip(keys, values)}


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
        f"({run.recipe.learning_rate_flags()}) and train again in a new --output_dir "
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
                f"{_last_checkpoint(run)}. Lower the learning rates ({run.recipe.learning_rate_flags()}) and train "
                "again in a new --output_dir (or with --overwrite_output_dir)."
            )
