"""The parser of every command but train's (`train_args.py`), each with its description: the one source of the help
texts that dpt_peft_launcher.py prints without importing torch (written by `python -m dpt_peft.cli.help_files`)."""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import shlex

from .train_args import HelpFormatter, add_train_fields, parse_given_flags

EVALUATE_DESCRIPTION = """Evaluate an adapter on a dataset split, optionally on base and new classes apart.

The data flags are train's (same names, defaults and help): repeat a run's data flags to evaluate on its data."""
PREDICT_DESCRIPTION = (
    "Classify images with an adapter: the top classes of each, as a table and as JSON lines in --output."
)
VISUALIZE_DESCRIPTION = """Draw the class-aware attention maps of each image's top classes, one PNG per image.

With --context, also print the vocabulary tokens nearest to each learned context vector."""
ABLATION_DESCRIPTION = (
    "Compare zero-shot CLIP, a linear probe, CoOp, VPT, VPT+CoOp, DPT and LoRA on the embedded default over seeds."
    """

Writes results.md (accuracy per seed, mean and std, trainable parameters and training time per method),
results.json and ablation.png. Any of train's flags given here go to every training run (e.g. --epochs 10);
`dpt-peft train --help` lists them. --variant adds a row whose runs also get its own flags, e.g.
--variant 'dpt_src=--method dpt --consistency_weights 10 25 1'."""
)
BENCHMARK_DESCRIPTION = """Run the paper's protocols on the CoOp datasets as a resumable grid of runs, and report them.

Writes results.md, results.csv and plots to --output_dir. Any of train's flags given here go to every training run;
`dpt-peft train --help` lists them. --variant adds a row whose runs also get its own flags. A linear probe scores
only the classes it was trained on: its new-class (base-to-new) and cross-dataset cells read n/a, with the reason."""
DATA_DESCRIPTION = "Check that CoOp datasets are laid out, split and complete as CoOp expects (`data check`)."


def _parser(command: str, description: str, passes_on_train_flags: bool = False) -> argparse.ArgumentParser:
    """`passes_on_train_flags`: no abbreviations, so that train's --seed or --dataset is not taken for --seeds or
    --datasets."""
    return argparse.ArgumentParser(
        prog=f"dpt-peft {command}",
        description=description,
        formatter_class=HelpFormatter,
        allow_abbrev=not passes_on_train_flags,
    )


def evaluate_parser() -> argparse.ArgumentParser:
    parser = _parser("evaluate", EVALUATE_DESCRIPTION)
    parser.add_argument("--adapter", required=True, help="Adapter directory or Hub id.")
    parser.add_argument("--model_name_or_path", default=None, help="Base model (default: the one the adapter records).")
    add_train_fields(parser, {"dataset": [], "data_root": [], "subsample_classes": []})
    parser.add_argument("--test_split", "--split", "--test-split", default="test", help="Split to evaluate.")
    add_train_fields(
        parser, {"image_column": [], "label_column": [], "class_names_file": [], "eval_batch_size": ["--batch_size"]}
    )
    parser.add_argument("--seed", type=int, default=1, help="Seed of generated toy datasets, as train's --seed.")
    parser.add_argument("--output_dir", default="outputs/eval", help="Folder for eval_metrics.json and plots.")
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Replace reports in --output_dir that dpt_peft did not write.",
    )
    parser.add_argument("--base_to_new", action="store_true", help="Also evaluate base/new halves of the classes.")
    parser.add_argument(
        "--base_classes",
        default=None,
        help="Comma-separated base class names (default: the first half, rounded up, as CoOp).",
    )
    parser.add_argument(
        "--new_classes", default=None, help="Comma-separated new class names (default: the classes not in base)."
    )
    parser.add_argument(
        "--zero_shot_template",
        default=None,
        help="Template of the frozen zero-shot classifier and the class-aware top-K, e.g. 'a photo of a {}.' "
        "(default: a CoOp dataset's own when the adapter learned none of its classes, as the benchmark; else the "
        "adapter's).",
    )
    _add_zero_shot_ensemble(parser)
    return parser


def _add_zero_shot_ensemble(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--zero_shot_ensemble",
        type=_ensemble_weight,
        default=None,
        metavar="W",
        help="Mix in the frozen zero-shot classifier: W x the adapter's probabilities + (1 - W) x zero-shot's, e.g. "
        "0.5 (default: the adapter's own setting; none: the adapter alone).",
    )


def _ensemble_weight(text: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        weight = math.nan
    if not 0 <= weight <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r}: give the adapter's weight as a number in [0, 1], e.g. 0.5")
    return weight


def _image_parser(command: str, description: str, top_k: int) -> argparse.ArgumentParser:
    parser = _parser(command, description)
    parser.add_argument("images", nargs="+", help="Image files and/or directories of images.")
    parser.add_argument("--adapter", required=True, help="Adapter directory or Hub id.")
    parser.add_argument("--model_name_or_path", default=None, help="Base model (default: the one the adapter records).")
    parser.add_argument("--class_names_file", default=None, help="New label space, one class name per line.")
    parser.add_argument("--top_k", type=int, default=top_k, help="Classes reported per image.")
    return parser


def predict_parser() -> argparse.ArgumentParser:
    parser = _image_parser("predict", PREDICT_DESCRIPTION, top_k=5)
    parser.add_argument("--output", default="predictions.jsonl", help="JSON lines: path, labels, probabilities.")
    parser.add_argument(
        "--overwrite_output",
        action="store_true",
        help="Replace an --output file that dpt_peft did not write (its own earlier predictions are always replaced).",
    )
    parser.add_argument("--batch_size", type=int, default=64, help="Images per forward.")
    _add_zero_shot_ensemble(parser)
    return parser


def visualize_parser() -> argparse.ArgumentParser:
    parser = _image_parser("visualize", VISUALIZE_DESCRIPTION, top_k=3)
    parser.add_argument("--output_dir", default="outputs/attention", help="Folder for one PNG per image.")
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="Replace PNGs in --output_dir that dpt_peft did not write."
    )
    parser.add_argument("--context", action="store_true", help="Print the nearest tokens of the learned context.")
    return parser


def _add_executor_flags(parser: argparse.ArgumentParser) -> None:
    """Where a grid's runs run (`experiments/executors.py`), for `ablation` and `benchmark`."""
    from ..experiments.executors import EXECUTORS

    group = parser.add_argument_group("executors (where the runs run)")
    group.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="sequential",
        help="sequential: one run after another here; local: one job per GPU (or --max_parallel CPU processes) of "
        "this machine; slurm: a SLURM job array, one GPU per task (local and slurm: pip install 'dpt-peft[cluster]').",
    )
    group.add_argument(
        "--gpus",
        type=_gpu_list,
        default=None,
        metavar="IDS",
        help="--executor local: the GPUs, one run on each at a time, e.g. 0,1,2,3 (default: every visible one).",
    )
    group.add_argument(
        "--max_parallel", type=int, default=None, help="--executor local: at most this many runs at once (CPU: 1)."
    )
    group.add_argument("--slurm_partition", default=None, help="--executor slurm: the partition (default: SLURM's).")
    group.add_argument(
        "--slurm_time_min",
        type=int,
        default=None,
        help="--executor slurm, required: each task's time limit in minutes; out of time, a task is requeued and "
        "continues from its checkpoint.",
    )
    group.add_argument(
        "--slurm_max_concurrent", type=int, default=None, help="--executor slurm: array tasks running at once."
    )
    group.add_argument(
        "--slurm_sbatch",
        nargs="+",
        type=_sbatch_setting,
        default=None,
        metavar="KEY=VALUE",
        help="--executor slurm: further sbatch settings, e.g. account=proj qos=high cpus-per-task=8 mem=64G.",
    )
    group.add_argument(
        "--print_commands",
        action="store_true",
        help="Train nothing: print `dpt-peft train SETTINGS.json` for each run not yet trained (the settings go to "
        "commands/ in the grid's folder); then run the same grid command to evaluate and report.",
    )


def _add_row_flags(parser: argparse.ArgumentParser, default_methods: list[str]) -> None:
    """The rows of a grid's table (`ablation`, `benchmark`): methods, and named variants with their own flags."""
    parser.add_argument(
        "--methods",
        nargs="+",
        default=default_methods,
        help="Methods, one row each (train's --method: linear_probe needs pip install 'dpt-peft[probe]').",
    )
    parser.add_argument(
        "--variant",
        action="append",
        type=_variant,
        default=None,
        metavar="NAME=FLAGS",
        help="A further row NAME whose runs get train's FLAGS on top of the grid's (part of their identity; their "
        "folders are named NAME); repeatable, e.g. 'dpt_src=--method dpt --consistency_weights 10 25 1'.",
    )


def _variant(text: str):
    """--variant NAME=FLAGS: the row's name and train's flags, parsed as train parses them."""
    from ..experiments.grid import Variant

    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r}: give NAME=FLAGS, e.g. 'dpt_src=--method dpt --consistency_weights 10 25 1'"
        )
    messages = io.StringIO()
    try:
        with contextlib.redirect_stderr(messages):
            options, config = parse_given_flags(shlex.split(flags))
    except SystemExit:  # train's parser refused a flag: its own message, in one line
        reason = (messages.getvalue().strip().splitlines() or ["not train's flags"])[-1]
        raise argparse.ArgumentTypeError(f"{text!r}: {reason.removeprefix('dpt-peft train: error: ')}") from None
    return Variant(name.strip(), options, config, flags.strip())


def _gpu_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(entry) for entry in text.split(",") if entry.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give GPU indices separated by commas, e.g. 0,1,2,3") from None


def _sbatch_setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: give an sbatch setting as KEY=VALUE, e.g. account=proj")
    return key.strip(), value


def ablation_parser() -> argparse.ArgumentParser:
    parser = _parser("ablation", ABLATION_DESCRIPTION, passes_on_train_flags=True)
    parser.add_argument("--output_dir", default="outputs/ablation", help="Folder of the ablation's training runs.")
    parser.add_argument(
        "--docs_dir", default=None, help="Folder for results.md, results.json and ablation.png (default: --output_dir)."
    )
    parser.add_argument(
        "--overwrite_reports", action="store_true", help="Replace report files dpt_peft did not write (e.g. docs/)."
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[1, 2, 3], help="Seeds of every method's runs (CoOp's)."
    )
    from ..experiments.ablation import METHODS

    _add_row_flags(parser, list(METHODS))
    _add_executor_flags(parser)
    return parser


def benchmark_parser() -> argparse.ArgumentParser:
    from ..experiments.benchmark import FEW_SHOT_DATASETS, PROTOCOLS

    parser = _parser("benchmark", BENCHMARK_DESCRIPTION, passes_on_train_flags=True)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="few_shot", help="The paper's protocol to run.")
    parser.add_argument("--data_root", required=True, help="Folder of the CoOp datasets (CoOp's DATASETS.md).")
    parser.add_argument("--datasets", nargs="+", default=list(FEW_SHOT_DATASETS), help="Training (or target) datasets.")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="Training images per class.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="Seeds of every cell's runs.")
    _add_row_flags(parser, ["coop", "vpt", "vpt_coop", "dpt"])
    parser.add_argument("--model_name_or_path", default="openai/clip-vit-base-patch16", help="Base CLIP.")
    parser.add_argument("--output_dir", default="outputs/benchmark", help="Folder of the grid's runs and reports.")
    parser.add_argument(
        "--confidence_interval", action="store_true", help="Add a 95%% confidence interval to every table cell."
    )
    parser.add_argument(
        "--overwrite_reports",
        action="store_true",
        help="Replace results.md, results.csv and plots in --output_dir/<protocol> that dpt_peft did not write.",
    )
    _add_executor_flags(parser)
    return parser


def data_parser() -> argparse.ArgumentParser:
    """`data` and its `check` subcommand (whose flags are `data_check_parser`'s)."""
    parser = _parser("data", DATA_DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, title="commands")
    commands.add_parser(
        "check",
        help="Verify layouts, split files and image counts.",
        description=DATA_DESCRIPTION,
        formatter_class=HelpFormatter,
        parents=[data_check_parser()],
        add_help=False,
    )
    return parser


def data_check_parser() -> argparse.ArgumentParser:
    from ..data.catalog import DATASET_NAMES

    parser = _parser("data check", DATA_DESCRIPTION)
    parser.add_argument("--data_root", required=True, help="Folder of the CoOp datasets (CoOp's DATASETS.md).")
    parser.add_argument("--datasets", nargs="+", default=list(DATASET_NAMES), help="Datasets to check.")
    parser.add_argument("--skip_missing_images", action="store_true", help="Report missing images as skipped.")
    return parser


EXPORT_DESCRIPTION = """Export an adapter for serving: model.onnx (or a torch.export program), pixel_values to logits.

The class features are computed once and stored in the file, so serving needs no text tower and no dpt_peft, PEFT or
transformers; another class list needs another export. The folder also gets the image processor's config,
class_names.json and a README saying how to run it. After writing, the file is run (onnxruntime, or
torch.export.load) on a few images at batch 1 and N, and the export is refused when its outputs differ from the
adapter's PyTorch forward beyond the tolerance (1e-5 of the logit scale in fp32, 1e-2 in fp16). ONNX needs
`pip install dpt-peft[export]`."""


def export_parser() -> argparse.ArgumentParser:
    from ..integrations.export import DTYPES, FORMATS

    parser = _parser("export", EXPORT_DESCRIPTION)
    parser.add_argument("--adapter", required=True, help="Adapter directory or Hub id.")
    parser.add_argument("--output_dir", required=True, help="Folder for the model file, its config and README.")
    parser.add_argument("--model_name_or_path", default=None, help="Base model (default: the one the adapter records).")
    classes = parser.add_mutually_exclusive_group()
    classes.add_argument("--class_names", nargs="+", default=None, help="Classes to serve (default: the adapter's).")
    classes.add_argument("--class_names_file", default=None, help="Classes to serve, one class name per line.")
    parser.add_argument("--format", choices=list(FORMATS), default="onnx", help="ONNX, or a torch.export program.")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="Precision of the weights inside.")
    parser.add_argument(
        "--opset", type=int, default=None, help="ONNX opset, 18 or later (default: the torch exporter's)."
    )
    parser.add_argument("--output_image_embeds", action="store_true", help="Also output the image features.")
    parser.add_argument(
        "--check_images", nargs="+", default=None, help="Images to check the file on (default: 5 synthetic ones)."
    )
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="Replace files in --output_dir that dpt_peft did not write."
    )
    return parser
