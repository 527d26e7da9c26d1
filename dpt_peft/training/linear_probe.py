"""`--method linear_probe`: logistic regression on the frozen model's image features, the baseline of CoOp's paper,
trained as CoOp's `lpclip/linear_probe.py` trains it, on the same few-shot sets, seeds and reports as a DPT run.

What CoOp's code does, and so does this module:
- features: the frozen model's projected image features (`get_image_features`), not normalized, of images
  preprocessed as for testing (no augmentation); CoOp's `feat_extractor.py` keeps `clip_model.visual(x)` as is;
- the classifier: scikit-learn's `LogisticRegression(solver="lbfgs", max_iter=1000)` with its default L2 penalty
  (lbfgs is deterministic: no random state to set);
- the regularization C: searched on the few-shot validation split (CoOp's min(shots, 4) images per class, the split
  a DPT run validates on), first over (1e6, 1e4, ..., 1e-6), then 8 halvings of a log-scale interval a decade either
  side of the best: each step fits both ends and keeps the better (the left on a tie), and the last step's winner is
  the C used; the final classifier is the one fitted on the training shots at that C.

Each split's features are computed once per run (one pass over its images) and kept in memory for the whole search
(23 fits); the zero-shot classifier is scored from the same features, so a run reads every image once.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import PartialState
from datasets import Dataset, DatasetDict

from ..config import DPTConfig
from ..data.batching import SkipCounter, undecoded
from ..data.catalog import MAX_VAL_SHOTS
from ..data.coop_splits import subsample_classes
from ..data.datasets import FewShotData, load_tasks
from ..data.few_shot import data_fingerprint, draw_shots
from ..sources import TOY_CLIP_ID
from ..utils.errors import UserInputError
from ..utils.seeding import seed_for
from .arguments import TrainArguments
from .linear_probe_model import (
    FEATURES,
    PROBE_FORMAT,
    FeatureSpec,
    FrozenFeatures,
    SplitFeatures,
    probe_split_metrics,
    probe_tensors,
    save_probe,
    shipped_fit,
    zero_shot_config,
)
from .run_dir import RunDir, check_run_flags, normalized
from .run_layout import METRICS_FILE
from .setup import check_launcher

METHOD = "linear_probe"
C_GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)  # CoOp's `search_list`
SEARCH_STEPS = 8  # CoOp's `--num_step`
MAX_ITER = 1000
SOLVER = "lbfgs"
# DPTConfig values a probe run uses: only what its zero-shot classifier needs (the template, and a shipped model's
# own settings, which make the classifier fit the model); any other given value would be silently ignored.
USED_CONFIG_VALUES = ("zero_shot_template",)
INSTALL_HINT = "--method linear_probe needs scikit-learn: pip install 'dpt-peft[probe]'"


def _logistic_regression():
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as err:
        raise UserInputError(INSTALL_HINT) from err
    return LogisticRegression


def check_probe_dependency() -> None:
    """scikit-learn importable, or the one line that says how to install it (before a grid's first run)."""
    _logistic_regression()


@dataclass(frozen=True)
class ProbeSearch:
    """The C chosen on the validation split, its validation accuracy, the classifier fitted at it, and every fit of
    the search in order (`stage`, `C`, `val_accuracy`, `converged`)."""

    c: float
    val_accuracy: float
    classifier: object
    trace: list[dict]


def fit_probe(features: np.ndarray, labels: np.ndarray, c: float, max_iter: int = MAX_ITER):
    """CoOp's classifier at regularization `c`; a fit that stops at `max_iter` is kept (as CoOp) and marked."""
    model = _logistic_regression()(solver=SOLVER, max_iter=max_iter, C=c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: recorded in the trace instead, once per fit
        return model.fit(features, labels)


def search_regularization(
    train: SplitFeatures,
    val: SplitFeatures,
    grid: tuple[float, ...] = C_GRID,
    steps: int = SEARCH_STEPS,
    max_iter: int = MAX_ITER,
) -> ProbeSearch:
    """CoOp's search of C (module docstring): the grid, then `steps` halvings around its best. A C met twice is
    fitted once (lbfgs is deterministic)."""
    fits: dict[float, tuple[object, float]] = {}
    trace: list[dict] = []

    def score(c: float, stage: str) -> tuple[object, float]:
        if c not in fits:
            model = fit_probe(train.features, train.labels, c, max_iter)
            fits[c] = (model, float(np.mean(model.predict(val.features) == val.labels)))
        model, accuracy = fits[c]
        converged = bool(np.max(model.n_iter_) < max_iter)
        trace.append({"stage": stage, "C": c, "val_accuracy": accuracy, "converged": converged})
        return model, accuracy

    accuracies = [score(c, "grid")[1] for c in grid]
    chosen = grid[int(np.argmax(accuracies))]  # the first best, as np.argmax
    left, right = 0.1 * chosen, 10.0 * chosen
    for step in range(steps):
        _, left_accuracy = score(left, f"step {step + 1} left")
        _, right_accuracy = score(right, f"step {step + 1} right")
        middle = 0.5 * (np.log10(right) + np.log10(left))
        if left_accuracy < right_accuracy:
            chosen, left, right = right, np.power(10, middle), np.power(10, np.log10(right))
        else:
            chosen, left, right = left, np.power(10, np.log10(left)), np.power(10, middle)
        left, right = float(left), float(right)
    model, accuracy = fits[chosen]
    return ProbeSearch(float(chosen), accuracy, model, trace)


# ---------------------------------------------------------------------------------------------- the run


def check_probe_arguments(args: TrainArguments, config_overrides: dict) -> None:
    """What a probe run cannot do, refused before any work."""
    if len(args.datasets) > 1:
        raise UserInputError("--method linear_probe fits one task's classifier; drop --tasks and give one --dataset.")
    if args.push_to_hub:
        raise UserInputError("--push_to_hub pushes adapters; a linear probe is not one. Drop --push_to_hub.")
    shipped = shipped_fit(args.model_name_or_path)
    unused = [
        name
        for name, value in config_overrides.items()
        if name not in USED_CONFIG_VALUES and shipped.get(name, object()) != value
    ]
    if unused:
        raise UserInputError(
            f"--{unused[0]} is a prompt setting; --method linear_probe learns no prompts. Drop it for this run."
        )
    if PartialState().num_processes > 1:
        raise UserInputError("--method linear_probe runs in one process; start it without `accelerate launch`.")
    check_probe_dependency()  # the missing extra named before the data loads


def probe_identity(
    args: TrainArguments, config_overrides: dict, tasks: dict[str, FewShotData]
) -> tuple[DPTConfig, dict]:
    """A probe run's zero-shot config and identity (as `setup.run_identity`, plus the search's settings)."""
    (data,) = tasks.values()
    config = zero_shot_config(data.class_names, config_overrides)
    search = {"C_grid": list(C_GRID), "search_steps": SEARCH_STEPS, "max_iter": MAX_ITER, "solver": SOLVER}
    identity = {
        **args.run_identity(config),
        "linear_probe": search,
        "data_fingerprint": data_fingerprint(tasks, args.image_column, args.label_column),
    }
    return config, normalized(identity)


def train_linear_probe(args: TrainArguments, config_overrides: dict) -> dict:
    """Fit, score and save a linear probe as a run: the run directory's checks and run.json as a DPT run's, then
    probe/ and metrics.json (with the DPT run's keys). A killed probe run is redone whole (it keeps no checkpoint):
    --overwrite_output_dir or --resume_from_checkpoint latest both start it again."""
    start = time.time()
    check_launcher()
    check_probe_arguments(args, config_overrides)
    resume = args.resume_from_checkpoint
    check_run_flags(args.output_dir, args.checkpoints_to_keep, args.overwrite_output_dir, resume)
    torch.manual_seed(args.seed)
    tasks = load_tasks(dataclasses.replace(args.data_spec, eval_every=1))  # the validation split the search needs
    ((_, data),) = tasks.items()
    config, identity = probe_identity(args, config_overrides, tasks)
    run_dir = RunDir(args.output_dir, resume=bool(resume), overwrite=args.overwrite_output_dir)
    process = PartialState()
    run_dir.check(identity, process)  # reads only: every refusal before the model loads
    features = FeatureSpec(
        args.model_name_or_path,
        args.attn_implementation,
        args.image_column,
        args.label_column,
        args.eval_batch_size,
        args.dataloader_num_workers or 0,
    )
    frozen = FrozenFeatures(config, features)
    run_dir.open(identity, process)
    try:
        fit_start = time.time()
        train, val = frozen.of(data.train), frozen.of(validation_split(args, data))
        search = search_regularization(train, val)
        train_seconds = time.time() - fit_start
        test = frozen.of(data.test)
        tensors = probe_tensors(search.classifier, len(data.class_names))
        metrics = probe_metrics(args, data, search, tensors, test, frozen.skips, train_seconds)
        metrics["wall_time_s"] = time.time() - start
        save_probe(run_dir, tensors, probe_record(args, config, search))
        run_dir.folder.write_json(METRICS_FILE, metrics)
    finally:
        run_dir.release()
    print(
        f"zero-shot accuracy {100 * metrics['zero_shot_accuracy']:.1f}%  ->  linear probe accuracy "
        f"{100 * metrics['accuracy']:.1f}% (C={search.c:.4g}; {metrics['num_images']} test images)  written to "
        f"{run_dir.path}"
    )
    return metrics


def validation_split(args: TrainArguments, data: FewShotData) -> Dataset:
    """The images C is chosen on: the task's few-shot validation split (CoOp's min(shots, 4) per class); for a CoOp
    dataset without one (ImageNet, where CoOp validates on the test set), as many per class drawn from the training
    images that are not shots. Never the test split."""
    if data.val is not None:
        return data.val
    if data.split_source is None or data.split_indices is None:
        raise UserInputError("The task has no validation images apart from its test split; a linear probe needs them.")
    source, shots = data.split_source["train"], set(data.split_indices["train"])
    pool = source.select([i for i in range(len(source)) if i not in shots])
    pool = subsample_classes(DatasetDict({"train": pool}), args.subsample_classes)["train"]
    names = pool.features["label"].names
    val, _ = draw_shots(pool, "label", names, min(args.shots, MAX_VAL_SHOTS), seed_for(args.seed, "validation_shots"))
    return undecoded(val, "image")


def probe_metrics(
    args: TrainArguments,
    data: FewShotData,
    search: ProbeSearch,
    tensors: dict[str, np.ndarray],
    test: SplitFeatures,
    skips: SkipCounter,
    train_seconds: float,
) -> dict:
    """metrics.json of a probe run: the keys of a DPT run's (those of its training loop null), then the search."""
    return {
        "method": METHOD,
        **probe_split_metrics(tensors, test, data.class_names, len(skips)).to_dict(),
        "trainable_parameters": int(tensors["weight"].size + tensors["bias"].size),
        "num_train_images": len(data.train),
        "epochs": None,
        "steps": None,
        "train_seconds": train_seconds,  # the training and validation features, and the search
        "train_images_per_s": None,
        "final_train_loss": None,
        "mixed_precision": "no",
        "input_pipeline": "pil",
        "best_epoch": None,
        "best_val_accuracy": search.val_accuracy,
        "adapter_epoch": None,
        "prompt_averaging": "none",
        "zero_shot_ensemble": None,
        "regularization_C": search.c,
        "regularization_search": search.trace,
        "probe_features": FEATURES,
    }


def probe_record(args: TrainArguments, config: DPTConfig, search: ProbeSearch) -> dict:
    """What the weights classify and how they were made (linear_probe.json)."""
    return {
        "format": PROBE_FORMAT,
        "method": METHOD,
        "base_model_name_or_path": args.base_model_id or args.model_name_or_path or TOY_CLIP_ID,
        "class_names": list(config.class_names),
        "zero_shot_template": config.zero_shot_template,
        "features": FEATURES,
        "C": search.c,
        "solver": SOLVER,
        "max_iter": MAX_ITER,
    }
