"""The evaluations of a training run: validation during training (keeping the best adapter) and the final report
(test metrics, adapter with its model card, metrics.json, history.json, the training curve)."""

from __future__ import annotations

import logging
from pathlib import Path

from peft import set_peft_model_state_dict
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file

from ..model_card import ModelCardInfo
from ..utils.plots import plot_training_curve
from ..utils.write_policy import OutputFolder
from .evaluation import split_metrics
from .run_layout import ADAPTER_DIR, BEST_ADAPTER_DIR, CURVE_FILE, HISTORY_FILE, LAST_ADAPTER_DIR, METRICS_FILE
from .run_state import Run

logger = logging.getLogger(__name__)
SUMMARY_KEYS = ("zero_shot_accuracy", "accuracy", "zero_shot_mean_per_class_accuracy", "mean_per_class_accuracy")


def validate(run: Run, epoch: int) -> float:
    """Mean accuracy over the tasks' few-shot validation splits; with --load_best_model_at_end, keep the best epoch's
    adapter in best_adapter/ (read back by `report`, and across a resumption).

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
            best = Path(run.args.output_dir) / BEST_ADAPTER_DIR
            unwrapped.save_pretrained(best, is_main_process=run.accelerator.is_main_process)
            if run.accelerator.is_main_process:
                OutputFolder(run.args.output_dir).record([BEST_ADAPTER_DIR])
    return accuracy


def load_best_adapter(run: Run) -> None:
    """--load_best_model_at_end (as transformers' Trainer): keep the last epoch's adapter in last_adapter/, then put
    the best validation epoch's prompts (best_adapter/) back into the model for the test and the final adapter."""
    accelerator, output_dir = run.accelerator, Path(run.args.output_dir)
    unwrapped = accelerator.unwrap_model(run.model)
    unwrapped.save_pretrained(output_dir / LAST_ADAPTER_DIR, is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process:
        OutputFolder(output_dir).record([LAST_ADAPTER_DIR])
    accelerator.wait_for_everyone()  # best_adapter/ was written by the main process
    best = load_file(output_dir / BEST_ADAPTER_DIR / SAFETENSORS_WEIGHTS_NAME)
    set_peft_model_state_dict(unwrapped, best, adapter_name=unwrapped.active_adapter)


def report(run: Run, wall_time: float) -> dict:
    """Evaluate every task on its held-out set; write the adapter, metrics.json, history.json and the curve. With
    --load_best_model_at_end these are of the best validation epoch (`adapter_epoch`), else of the last."""
    args, accelerator, state = run.args, run.accelerator, run.state
    run.progress.close()
    adapter_epoch = state.epochs_done - 1
    if args.save_best and state.best_epoch is not None and state.best_epoch != adapter_epoch:
        load_best_adapter(run)
        adapter_epoch = state.best_epoch
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
            # what ran: accelerate runs fp16 on a CPU in fp32 (no autocast), while still naming fp16
            "mixed_precision": accelerator.mixed_precision if accelerator.native_amp else "no",
            "input_pipeline": run.input_pipeline,
            "best_epoch": state.best_epoch,
            "best_val_accuracy": state.best_val_accuracy,
            "adapter_epoch": adapter_epoch,
        }
    )
    if skipped:
        logger.warning("Skipped %d unreadable images: %s", len(skipped), skipped[:10])
    output_dir = Path(args.output_dir)
    unwrapped = accelerator.unwrap_model(run.model)
    card = ModelCardInfo(args.base_model_id, ",".join(args.datasets), args.shots, metrics)
    unwrapped.save_pretrained(
        output_dir / ADAPTER_DIR, is_main_process=accelerator.is_main_process, model_card_info=card
    )
    if accelerator.is_main_process:
        folder = OutputFolder(output_dir)  # atomic writes, each recorded as the run's (docs/reliability.md)
        folder.record([ADAPTER_DIR])
        folder.write_json(HISTORY_FILE, state.history)
        folder.write(CURVE_FILE, lambda temporary: plot_training_curve(state.history, str(temporary)))
        folder.write_json(METRICS_FILE, metrics)  # last: a run with metrics.json is finished
        accelerator.print(
            f"zero-shot accuracy {100 * metrics['zero_shot_accuracy']:.1f}%  ->  {args.method} accuracy "
            f"{100 * metrics['accuracy']:.1f}%  ({metrics['num_test_images']} test images"
            f"{f', mean of {len(run.tasks)} tasks' if run.multitask else ''}, {wall_time:.0f}s)  written to "
            f"{output_dir}"
        )
        if args.push_to_hub:
            unwrapped.push_to_hub(args.hub_repo_id)
    accelerator.log(
        {f"test/{key}": metrics[key] for key in SUMMARY_KEYS if metrics.get(key) is not None}, step=state.global_step
    )
    accelerator.end_training()
    return metrics
