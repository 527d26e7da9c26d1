"""The evaluations of a training run: validation during training (keeping the best adapter) and the final report
(test metrics, adapter with its model card, metrics.json, history.json, the training curve)."""

from __future__ import annotations

import logging

from peft import set_peft_model_state_dict
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file

from ..model_card import ModelCardInfo
from ..utils.plots import plot_training_curve
from .evaluation import evaluate_split
from .prompt_averaging import resolved_mean_std
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
        evaluate_split(
            run.model,
            loader,
            accelerator=run.accelerator,
            task=name if run.multitask else None,
            frozen_features=run.frozen_val_features.setdefault(name, {}),
        ).accuracy
        for name, loader in run.loaders.val.items()
    ]
    accuracy = sum(accuracies) / len(accuracies)
    state = run.state
    if state.best_val_accuracy is None or accuracy > state.best_val_accuracy:
        state.best_val_accuracy, state.best_epoch = accuracy, epoch
        if run.args.save_best and run.accelerator.is_main_process:  # whole or not at all (docs/reliability.md 13)
            run.run_dir.write_folder(BEST_ADAPTER_DIR, run.accelerator.unwrap_model(run.model).save_pretrained)
    return accuracy


def load_best_adapter(run: Run) -> None:
    """--load_best_model_at_end (as transformers' Trainer): keep the last epoch's adapter in last_adapter/, then put
    the best validation epoch's prompts (best_adapter/) back into the model for the test and the final adapter."""
    accelerator, output_dir = run.accelerator, run.run_dir.path
    unwrapped = accelerator.unwrap_model(run.model)
    if accelerator.is_main_process:
        run.run_dir.write_folder(LAST_ADAPTER_DIR, unwrapped.save_pretrained)
    accelerator.wait_for_everyone()  # best_adapter/ was written by the main process
    best = load_file(output_dir / BEST_ADAPTER_DIR / SAFETENSORS_WEIGHTS_NAME)
    set_peft_model_state_dict(unwrapped, best, adapter_name=unwrapped.active_adapter)


def load_prompt_average(run: Run) -> None:
    """--prompt_averaging gaussian: keep the last epoch's adapter in last_adapter/, then put the Gaussian-weighted
    average of the epochs' prompts into the model for the test and the final adapter."""
    accelerator = run.accelerator
    unwrapped = accelerator.unwrap_model(run.model)
    if accelerator.is_main_process:
        run.run_dir.write_folder(LAST_ADAPTER_DIR, unwrapped.save_pretrained)
    run.prompt_average.load_into({key: parameter for key, (_, parameter) in unwrapped.adapter_parameters().items()})


def held_out_metrics(run: Run) -> dict:
    """Every task's `SplitMetrics` on its held-out set: one task's as they are; several tasks' mean of SUMMARY_KEYS,
    their images in all, and each task's own under "tasks"."""
    per_task = {
        name: evaluate_split(
            run.model,
            run.loaders.test[name],
            accelerator=run.accelerator,
            task=name if run.multitask else None,
        )
        for name in run.tasks
    }
    if not run.multitask:
        return next(iter(per_task.values())).to_dict()
    summary: dict = {key: sum(getattr(m, key) for m in per_task.values()) / len(per_task) for key in SUMMARY_KEYS}
    summary["tasks"] = {name: metrics.to_dict() for name, metrics in per_task.items()}
    summary["num_images"] = sum(metrics.num_images for metrics in per_task.values())
    return summary


def report(run: Run, wall_time: float) -> dict:
    """Evaluate every task on its held-out set; write the adapter, metrics.json, history.json and the curve. With
    --load_best_model_at_end these are of the best validation epoch (`adapter_epoch`), with --prompt_averaging
    gaussian of the epochs' average (`adapter_epoch` null), else of the last epoch."""
    args, accelerator, state = run.args, run.accelerator, run.state
    run.progress.close()
    adapter_epoch = state.epochs_done - 1
    if args.save_best and state.best_epoch is not None and state.best_epoch != adapter_epoch:
        load_best_adapter(run)
        adapter_epoch = state.best_epoch
    averaging: dict = {"prompt_averaging": args.prompt_averaging}
    if run.prompt_average is not None:
        load_prompt_average(run)
        adapter_epoch = None
        mean, std = resolved_mean_std(args.epochs, args.prompt_averaging_mean, args.prompt_averaging_std)
        averaging.update(prompt_averaging_mean=mean, prompt_averaging_std=std)
    config = getattr(accelerator.unwrap_model(run.model), "active_peft_config", None)
    metrics = {"method": args.method, **held_out_metrics(run)}
    skipped = run.loaders.skips.skipped  # the run's, training and test images alike
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
            **averaging,
            "zero_shot_ensemble": getattr(config, "zero_shot_ensemble", None),  # the adapter's own, if any
        }
    )
    if skipped:
        logger.warning("Skipped %d unreadable images: %s", len(skipped), skipped[:10])
    write_run_reports(run, metrics, wall_time)
    accelerator.log(
        {f"test/{key}": metrics[key] for key in SUMMARY_KEYS if metrics.get(key) is not None}, step=state.global_step
    )
    accelerator.end_training()
    return metrics


def write_run_reports(run: Run, metrics: dict, wall_time: float) -> None:
    """The adapter with its model card, history.json, the curve and metrics.json (last: a run with it is finished)."""
    args, accelerator, state = run.args, run.accelerator, run.state
    output_dir = run.run_dir.path
    unwrapped = accelerator.unwrap_model(run.model)
    card = ModelCardInfo(args.base_model_id, ",".join(args.datasets), args.shots, metrics)
    if not accelerator.is_main_process:
        return
    run.run_dir.write_folder(ADAPTER_DIR, lambda folder: unwrapped.save_pretrained(folder, model_card_info=card))
    folder = run.run_dir.folder  # atomic writes, each recorded as the run's (docs/reliability.md)
    folder.write_json(HISTORY_FILE, state.history)
    folder.write(CURVE_FILE, lambda temporary: plot_training_curve(state.history, str(temporary)))
    folder.write_json(METRICS_FILE, metrics)
    accelerator.print(
        f"zero-shot accuracy {100 * metrics['zero_shot_accuracy']:.1f}%  ->  {args.method} accuracy "
        f"{100 * metrics['accuracy']:.1f}%  ({metrics['num_images']} test images"
        f"{f', mean of {len(run.tasks)} tasks' if run.multitask else ''}, {wall_time:.0f}s)  written to "
        f"{output_dir}"
    )
