"""Every command of dpt_peft: `dpt-peft <command>`, `python -m dpt_peft <command>`, and the examples/ scripts.

dpt-peft train [--help]          # accelerate launch -m dpt_peft train ... for several processes
dpt-peft evaluate --adapter DIR [--base_to_new]
dpt-peft predict --adapter DIR IMAGES...
dpt-peft visualize --adapter DIR IMAGES... [--context]
dpt-peft ablation [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

from .integrations.inference import expand_paths, predict
from .sources import load_adapted_model, read_class_names


def train_main(argv: list[str] | None = None) -> dict:
    """Train a DPT adapter (defaults: the embedded toy task); see --help for every flag."""
    from .training.arguments import parse_args
    from .training.trainer import train

    args, overrides = parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING  # quiet by default: warnings and the progress bar
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dpt_peft").setLevel(level)
    return train(args, overrides)


def evaluate_main(argv: list[str] | None = None) -> dict:
    """Evaluate an adapter on a dataset split (optionally base-to-new)."""
    from .data.datasets import load_checked_split
    from .training.evaluation import evaluate_adapter

    parser = argparse.ArgumentParser(description=evaluate_main.__doc__, formatter_class=_Formatter)
    parser.add_argument("--adapter", required=True, help="Adapter directory or Hub id.")
    parser.add_argument("--model_name_or_path", default=None, help="Base CLIP (default: the toy CLIP).")
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
    parser.add_argument("--split", default="test")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--class_names_file", default=None)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--output_dir", default="outputs/eval")
    parser.add_argument("--base_to_new", action="store_true", help="Also evaluate base/new halves of the classes.")
    parser.add_argument("--base_classes", default=None, help="Comma-separated base class names.")
    parser.add_argument("--new_classes", default=None, help="Comma-separated new class names.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of generated toy datasets.")
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
    _check_writable_file(parser, args.output, "--output", args.overwrite_output)
    paths = expand_paths(args.images)
    model, processor = _adapted_model(args)
    predictions = predict(
        model, paths, top_k=args.top_k, processor=processor, batch_size=args.batch_size, progress=True
    )
    rows = [{"path": p.source, "labels": p.labels, "probabilities": p.scores} for p in predictions]
    with open(args.output, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
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
    from .data.images import open_rgb
    from .integrations.visualize import class_aware_attention, nearest_context_tokens
    from .utils.plots import save_attention_figure

    parser = argparse.ArgumentParser(description=visualize_main.__doc__, formatter_class=_Formatter)
    _image_arguments(parser)
    parser.set_defaults(top_k=3)
    parser.add_argument("--output_dir", default="outputs/attention")
    parser.add_argument("--context", action="store_true", help="Print the nearest tokens of the learned context.")
    args = parser.parse_args(argv)
    _check_positive(parser, args, "top_k")
    paths = expand_paths(args.images)
    model, processor = _adapted_model(args)
    if args.context:
        for position, nearest in enumerate(nearest_context_tokens(model)):
            print(f"context {position}: " + ", ".join(f"{token} ({score:.2f})" for token, score in nearest))
    os.makedirs(args.output_dir, exist_ok=True)
    written = []
    predictions = predict(model, paths, top_k=args.top_k, processor=processor)
    names = _figure_names([prediction.source for prediction in predictions])
    for prediction, name in zip(predictions, names):
        image = open_rgb(prediction.source)
        maps = [class_aware_attention(model, image, label, processor=processor) for label in prediction.labels]
        path = os.path.join(args.output_dir, name)
        title = ", ".join(f"{label} {100 * s:.0f}%" for label, s in zip(prediction.labels, prediction.scores))
        save_attention_figure(image, maps, path, title)
        written.append(path)
    print(f"{len(written)} figures written to {args.output_dir}")
    return written


def ablation_main(argv: list[str] | None = None) -> dict:
    """Zero-shot vs CoOp, VPT, VPT+CoOp and DPT on the embedded default over several seeds; writes
    results.md, results.json and ablation.png to --docs_dir. Unknown flags go to every training run."""
    from .experiments.ablation import run_ablation, write_report

    parser = argparse.ArgumentParser(description=ablation_main.__doc__, formatter_class=_Formatter)
    parser.add_argument("--output_dir", default="outputs/ablation")
    parser.add_argument("--docs_dir", default="docs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args, extra = parser.parse_known_args(argv)
    results = run_ablation(args.output_dir, tuple(args.seeds), extra)
    markdown = os.path.join(args.docs_dir, "results.md")
    write_report(results, markdown, os.path.join(args.docs_dir, "ablation.png"), "dpt-peft ablation")
    with open(markdown) as f:
        print(f.read())
    return results


def benchmark_main(argv: list[str] | None = None) -> str:
    """The paper's protocols on the CoOp datasets (few_shot, base_to_new, cross_dataset, domain_generalization): a
    resumable grid of runs, then results.md, results.csv and plots. Unknown flags go to every training run."""
    from .experiments.benchmark import FEW_SHOT_DATASETS, PROTOCOLS, benchmark

    parser = argparse.ArgumentParser(description=benchmark_main.__doc__, formatter_class=_Formatter)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="few_shot")
    parser.add_argument("--data_root", required=True, help="Folder of the CoOp datasets (CoOp's DATASETS.md).")
    parser.add_argument("--datasets", nargs="+", default=list(FEW_SHOT_DATASETS), help="Training (or target) datasets.")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=["coop", "vpt", "vpt_coop", "dpt"])
    parser.add_argument("--model_name_or_path", default="openai/clip-vit-base-patch16", help="Base CLIP.")
    parser.add_argument("--output_dir", default="outputs/benchmark")
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
        extra,
    )
    print(report.read_text())
    return str(report)


COMMANDS: dict[str, Callable] = {
    "train": train_main,
    "evaluate": evaluate_main,
    "predict": predict_main,
    "visualize": visualize_main,
    "ablation": ablation_main,
    "benchmark": benchmark_main,
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
    COMMANDS[argv[0]](argv[1:])


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


def _check_writable_file(parser: argparse.ArgumentParser, path: str, flag: str, overwrite: bool) -> None:
    """Before any work: the output can be written where asked, and no existing file is replaced unasked."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        parser.error(f"{flag} {path} is a directory; give a file name such as predictions.jsonl.")
    if os.path.exists(path) and not overwrite:
        parser.error(f"{flag} {path} already exists; choose another file, or pass --overwrite_output to replace it.")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        parser.error(f"{flag} {path}: the folder {folder} does not exist or is not writable.")


def _comma_list(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",")] if text else None


def _image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="Image files and/or directories of images.")
    parser.add_argument("--adapter", required=True, help="Adapter directory or Hub id.")
    parser.add_argument("--model_name_or_path", default=None, help="Base CLIP (default: the toy CLIP).")
    parser.add_argument("--class_names_file", default=None, help="New label space, one class name per line.")
    parser.add_argument("--top_k", type=int, default=5)


def _adapted_model(args: argparse.Namespace):
    class_names = read_class_names(args.class_names_file) if args.class_names_file else None
    return load_adapted_model(args.adapter, args.model_name_or_path, class_names)
