"""Every command of dpt_peft: `dpt-peft <command>`, `python -m dpt_peft <command>`, and the examples/ scripts.

dpt-peft train [--help]          # accelerate launch -m dpt_peft train ... for several processes
dpt-peft evaluate --adapter DIR [--base_to_new]
dpt-peft predict --adapter DIR IMAGES...
dpt-peft visualize --adapter DIR IMAGES... [--context]
dpt-peft ablation [--seeds 1 2 3]
dpt-peft benchmark --protocol few_shot --data_root DATA
dpt-peft data check --data_root DATA [--datasets imagenet eurosat]

The flags of `train` are built in `train_args.py` from the fields of `TrainArguments` and `DPTConfig`; the library
never imports this package.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from collections.abc import Callable

from ..integrations.inference import expand_paths, predict
from ..sources import load_adapted_model
from ..utils.write_policy import OutputFolder, UserInputError, checked_file, run_command
from .train_args import build_parser, parse_args, parse_given_flags

__all__ = ["COMMANDS", "build_parser", "main"]


def train_main(argv: list[str] | None = None) -> dict:
    """Train a DPT adapter (defaults: the embedded toy task); see --help for every flag."""
    from ..training.trainer import train

    args, overrides = parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING  # quiet by default: warnings and the progress bar
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dpt_peft").setLevel(level)
    if not args.verbose:  # our progress bar only: not datasets' "Flattening the indices" or "Loading weights"
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    return train(args, overrides)


def evaluate_main(argv: list[str] | None = None) -> dict:
    """Evaluate an adapter on a dataset split (optionally base-to-new)."""
    from ..data.datasets import load_checked_split
    from ..training.evaluation import evaluate_adapter

    parser = argparse.ArgumentParser(description=evaluate_main.__doc__, formatter_class=_Formatter)
    parser.add_argument("--adapter", required=True, help="Adapter directory or Hub id.")
    parser.add_argument("--model_name_or_path", default=None, help="Base model (default: the one the adapter records).")
    parser.add_argument(
        "--dataset",
        default="toy-position",
        help="CoOp benchmark dataset (with --data_root), Hub dataset, imagefolder, or toy task.",
    )
    parser.add_argument("--data_root", default=None, help="Folder of the CoOp benchmark datasets (CoOp's DATASETS.md).")
    parser.add_argument(
        "--subsample_classes",
        default="all",
        choices=["all", "base", "new"],
        help="Keep CoCoOp's base or new half of the classes.",
    )
    parser.add_argument("--split", "--test_split", default="test", help="Split to evaluate (train's --test_split).")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--class_names_file", default=None)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--output_dir", default="outputs/eval", help="Folder for eval_metrics.json and plots.")
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Replace reports in --output_dir that dpt_peft did not write.",
    )
    parser.add_argument("--base_to_new", action="store_true", help="Also evaluate base/new halves of the classes.")
    parser.add_argument("--base_classes", default=None, help="Comma-separated base class names.")
    parser.add_argument("--new_classes", default=None, help="Comma-separated new class names.")
    parser.add_argument("--seed", type=int, default=1, help="Seed of generated toy datasets (train's default).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    _, split, class_names = load_checked_split(
        args.dataset,
        args.split,
        args.image_column,
        args.label_column,
        args.class_names_file,
        args.seed,
        data_root=args.data_root,
        subsample=args.subsample_classes,
    )
    report = evaluate_adapter(
        args.model_name_or_path,
        args.adapter,
        split,
        class_names,
        args.image_column,
        args.label_column,
        args.output_dir,
        args.batch_size,
        _comma_list(args.base_classes),
        _comma_list(args.new_classes),
        args.base_to_new,
        overwrite_output_dir=args.overwrite_output_dir,
    )
    print(json.dumps({k: v for k, v in report.items() if k != "per_class_accuracy"}, indent=2))
    return report


def predict_main(argv: list[str] | None = None) -> list[dict]:
    """Top-k classes of each image: a table on stdout and JSON lines in --output."""
    parser = argparse.ArgumentParser(description=predict_main.__doc__, formatter_class=_Formatter)
    _image_arguments(parser)
    parser.add_argument("--output", default="predictions.jsonl", help="JSON lines: path, labels, probabilities.")
    parser.add_argument("--overwrite_output", action="store_true", help="Replace an existing --output file.")
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    _check_positive(parser, args, "top_k", "batch_size")
    try:  # before any work; a refusal is the parser's error, as for any flag
        folder, name = checked_file(args.output, "--output", "--overwrite_output", args.overwrite_output)
    except UserInputError as err:
        parser.error(str(err))
    paths = expand_paths(args.images)
    model, processor = _adapted_model(args)
    predictions = predict(
        model, paths, top_k=args.top_k, processor=processor, batch_size=args.batch_size, progress=True
    )
    rows = [{"path": p.source, "labels": p.labels, "probabilities": p.scores} for p in predictions]
    folder.write_text(name, "".join(json.dumps(row) + "\n" for row in rows))
    width = max((len(row["path"]) for row in rows), default=4)
    print(f"{'image':<{width}}  top classes")
    for row in rows:
        ranked = ", ".join(f"{label} {100 * p:.1f}%" for label, p in zip(row["labels"], row["probabilities"]))
        print(f"{row['path']:<{width}}  {ranked}")
    skipped = len(paths) - len(rows)
    print(f"{len(rows)} images classified, {skipped} skipped (unreadable); written to {args.output}")
    return rows


def visualize_main(argv: list[str] | None = None) -> list[str]:
    """Class-aware attention maps of each image's top classes (one PNG per image), and with --context the
    vocabulary tokens nearest to each learned context vector."""
    from ..data.images import open_rgb
    from ..integrations.visualize import class_aware_attention, nearest_context_tokens
    from ..utils.plots import save_attention_figure

    parser = argparse.ArgumentParser(description=visualize_main.__doc__, formatter_class=_Formatter)
    _image_arguments(parser)
    parser.set_defaults(top_k=3)
    parser.add_argument("--output_dir", default="outputs/attention", help="Folder for one PNG per image.")
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="Replace PNGs in --output_dir that dpt_peft did not write."
    )
    parser.add_argument("--context", action="store_true", help="Print the nearest tokens of the learned context.")
    args = parser.parse_args(argv)
    _check_positive(parser, args, "top_k")
    paths = expand_paths(args.images)
    figures = OutputFolder(args.output_dir)  # before any work: never an input photo or a PNG dpt_peft did not write
    try:
        figures.check(_figure_names([str(path) for path in paths]), "--overwrite_output_dir", args.overwrite_output_dir)
    except UserInputError as err:
        parser.error(str(err))
    model, processor = _adapted_model(args)
    if args.context:
        for position, nearest in enumerate(nearest_context_tokens(model)):
            print(f"context {position}: " + ", ".join(f"{token} ({score:.2f})" for token, score in nearest))
    written = []
    predictions = predict(model, paths, top_k=args.top_k, processor=processor)
    names = _figure_names([prediction.source for prediction in predictions])
    for prediction, name in zip(predictions, names):
        image = open_rgb(prediction.source)
        maps = [class_aware_attention(model, image, label, processor=processor) for label in prediction.labels]
        title = ", ".join(f"{label} {100 * s:.0f}%" for label, s in zip(prediction.labels, prediction.scores))
        written.append(str(figures.write(name, functools.partial(save_attention_figure, image, maps, title=title))))
    print(f"{len(written)} figures written to {args.output_dir}")
    return written


def ablation_main(argv: list[str] | None = None) -> dict:
    """Zero-shot vs CoOp, VPT, VPT+CoOp and DPT on the embedded default over several seeds; writes
    results.md, results.json and ablation.png to --docs_dir. Unknown flags go to every training run."""
    from ..experiments.ablation import check_report_target, report_paths, run_ablation, write_report

    parser = argparse.ArgumentParser(description=ablation_main.__doc__, formatter_class=_Formatter)
    parser.add_argument("--output_dir", default="outputs/ablation")
    parser.add_argument(
        "--docs_dir", default=None, help="Folder for results.md, results.json and ablation.png (default: --output_dir)."
    )
    parser.add_argument(
        "--overwrite_reports", action="store_true", help="Replace report files dpt_peft did not write (e.g. docs/)."
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[1, 2, 3], help="Seeds of every method's runs (CoOp's)."
    )
    args, extra = parser.parse_known_args(argv)
    markdown, figure = report_paths(args.output_dir, args.docs_dir)
    check_report_target(markdown, figure, overwrite=args.overwrite_reports)
    results = run_ablation(args.output_dir, tuple(args.seeds), *parse_given_flags(extra))
    write_report(results, markdown, figure, "dpt-peft ablation")
    with open(markdown) as f:
        print(f.read())
    return results


def benchmark_main(argv: list[str] | None = None) -> str:
    """The paper's protocols on the CoOp datasets (few_shot, base_to_new, cross_dataset, domain_generalization): a
    resumable grid of runs, then results.md, results.csv and plots. Unknown flags go to every training run."""
    from ..experiments.benchmark import FEW_SHOT_DATASETS, PROTOCOLS, benchmark

    parser = argparse.ArgumentParser(description=benchmark_main.__doc__, formatter_class=_Formatter)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="few_shot")
    parser.add_argument("--data_root", required=True, help="Folder of the CoOp datasets (CoOp's DATASETS.md).")
    parser.add_argument("--datasets", nargs="+", default=list(FEW_SHOT_DATASETS), help="Training (or target) datasets.")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=["coop", "vpt", "vpt_coop", "dpt"])
    parser.add_argument("--model_name_or_path", default="openai/clip-vit-base-patch16", help="Base CLIP.")
    parser.add_argument("--output_dir", default="outputs/benchmark", help="Folder of the grid's runs and reports.")
    parser.add_argument(
        "--confidence_interval", action="store_true", help="Add a 95%% confidence interval to every table cell."
    )
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report = benchmark(
        args.protocol,
        args.data_root,
        args.output_dir,
        args.datasets,
        args.shots,
        args.seeds,
        args.methods,
        args.model_name_or_path,
        *parse_given_flags(extra),
        confidence_interval=args.confidence_interval,
    )
    print(report.read_text())
    return str(report)


def data_main(argv: list[str] | None = None) -> bool:
    """`data check`: whether each CoOp dataset under --data_root is laid out, split and complete as CoOp expects,
    and where CoOp's DATASETS.md gets what is missing."""
    from ..data.catalog import DATASET_NAMES
    from ..data.check import check_data

    parser = argparse.ArgumentParser(description=data_main.__doc__, formatter_class=_Formatter)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="Verify layouts, split files and image counts.")
    check.add_argument("--data_root", required=True, help="Folder of the CoOp datasets (CoOp's DATASETS.md).")
    check.add_argument("--datasets", nargs="+", default=list(DATASET_NAMES), help="Datasets to check.")
    check.add_argument("--skip_missing_images", action="store_true", help="Report missing images as skipped.")
    args = parser.parse_args(argv)
    checks = check_data(args.data_root, args.datasets, args.skip_missing_images)
    print("\n".join(c.summary() for c in checks))
    if not all(c.ok for c in checks):
        raise SystemExit(1)
    return True


COMMANDS: dict[str, Callable] = {
    "train": train_main,
    "evaluate": evaluate_main,
    "predict": predict_main,
    "visualize": visualize_main,
    "ablation": ablation_main,
    "benchmark": benchmark_main,
    "data": data_main,
}


def main(argv: list[str] | None = None) -> None:
    """`dpt-peft <command> [flags]`; each command's own --help lists its flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        lines = [f"usage: dpt-peft {{{names}}} [--help] ...", ""]
        lines += [f"  {name:10} {command.__doc__.splitlines()[0]}" for name, command in COMMANDS.items()]
        print("\n".join(lines), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    sys.argv[0] = f"dpt-peft {argv[0]}"
    flags = argv[1:]
    verbose = "--verbose" in flags  # a refusal is one line (what, why, the fix); --verbose adds the traceback
    if argv[0] != "train":  # train's own --verbose also sets its log level
        flags = [flag for flag in flags if flag != "--verbose"]
    run_command(COMMANDS[argv[0]], flags, verbose)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and descriptions as written."""


def _figure_names(sources: list[str]) -> list[str]:
    """One PNG name per image: its file stem, with its parent folder's name (and a counter) where stems repeat."""
    stems = [os.path.splitext(os.path.basename(source))[0] for source in sources]
    names, taken = [], set()
    for source, stem in zip(sources, stems):
        name = stem if stems.count(stem) == 1 else f"{os.path.basename(os.path.dirname(source))}_{stem}"
        candidate, counter = name, 1
        while candidate in taken:
            counter += 1
            candidate = f"{name}_{counter}"
        taken.add(candidate)
        names.append(candidate + ".png")
    return names


def _check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)} must be at least 1.")


def _comma_list(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",")] if text else None


def _image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="Image files and/or directories of images.")
    parser.add_argument("--adapter", required=True, help="Adapter directory or Hub id.")
    parser.add_argument("--model_name_or_path", default=None, help="Base model (default: the one the adapter records).")
    parser.add_argument("--class_names_file", default=None, help="New label space, one class name per line.")
    parser.add_argument("--top_k", type=int, default=5)


def _adapted_model(args: argparse.Namespace):
    from ..data.datasets import read_class_names

    class_names = read_class_names(args.class_names_file) if args.class_names_file else None
    return load_adapted_model(args.adapter, args.model_name_or_path, class_names)
