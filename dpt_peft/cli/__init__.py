"""Every command of dpt_peft: `dpt-peft <command>`, `python -m dpt_peft <command>`, and the examples/ scripts.

`COMMANDS` at the bottom is the one table of commands: the overview (`dpt-peft --help`), the help files the launcher
ships (`help_files.py`) and `main` iterate it. Adding a command is a parser (`parsers.py`), a function here that
parses and calls the library, and its row in `COMMANDS`; then `python -m dpt_peft.cli.help_files`. The library never
imports this package.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys

from ..integrations.inference import expand_paths, predict
from ..sources import load_adapted_model, read_adapter_config
from ..training.ensemble import ensemble_in_effect
from ..utils.write_policy import OutputFolder, check_writable_dir, checked_file
from .commands import Command, overview, run_command
from .parsers import (
    ablation_parser,
    benchmark_parser,
    data_check_parser,
    data_parser,
    evaluate_parser,
    export_parser,
    predict_parser,
    visualize_parser,
)
from .train_args import build_parser, parse_args, parse_given_flags

__all__ = ["COMMANDS", "build_parser", "main", "parse_args"]


def train_main(argv: list[str] | None = None) -> dict:
    """`dpt-peft train`: the run's metrics (flags: `train_args.py`)."""
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
    """`dpt-peft evaluate`: the evaluation report (flags: `parsers.evaluate_parser`). A CoOp dataset whose classes the
    adapter did not learn is prompted with its own zero-shot template (`evaluation.target_template`), unless
    --zero_shot_template names one."""
    from ..data.datasets import load_checked_split
    from ..training.evaluation import EvaluationSpec, evaluate_adapter, target_template
    from ..training.linear_probe_model import evaluate_linear_probe, is_linear_probe

    args = evaluate_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_writable_dir(args.output_dir, "--output_dir")  # before the data loads; evaluate_adapter checks its files
    probe = is_linear_probe(args.adapter)  # a probe run's folder or its probe/: scored by its own weights
    adapter_config = None if probe else read_adapter_config(args.adapter)  # before the data

    _, split, class_names = load_checked_split(
        args.dataset,
        args.test_split,
        args.image_column,
        args.label_column,
        args.class_names_file,
        args.seed,
        data_root=args.data_root,
        subsample=args.subsample_classes,
    )
    spec = EvaluationSpec(
        adapter=args.adapter,
        split=split,
        class_names=class_names,
        model_name_or_path=args.model_name_or_path,
        image_column=args.image_column,
        label_column=args.label_column,
        batch_size=args.eval_batch_size,
        base_to_new=args.base_to_new,
        base_classes=_comma_list(args.base_classes),
        new_classes=_comma_list(args.new_classes),
        zero_shot_template=args.zero_shot_template
        or (None if probe else target_template(args.dataset, class_names, adapter_config)),
        adapter_config=adapter_config,
        zero_shot_ensemble=args.zero_shot_ensemble,
    )
    evaluate = evaluate_linear_probe if probe else evaluate_adapter
    report = evaluate(spec, args.output_dir, overwrite_output_dir=args.overwrite_output_dir)
    print(json.dumps({k: v for k, v in report.items() if k != "per_class_accuracy"}, indent=2))
    return report


def predict_main(argv: list[str] | None = None) -> list[dict]:
    """`dpt-peft predict`: one row per readable image (flags: `parsers.predict_parser`)."""
    parser = predict_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    _check_positive(parser, args, "top_k", "batch_size")
    folder, name = checked_file(args.output, "--output", "--overwrite_output", args.overwrite_output)  # before work
    paths = expand_paths(args.images)
    model, processor = _adapted_model(args)
    predictions = predict(
        model,
        paths,
        top_k=args.top_k,
        processor=processor,
        batch_size=args.batch_size,
        progress=True,
        zero_shot_ensemble=args.zero_shot_ensemble,
    )
    ensemble = args.zero_shot_ensemble if args.zero_shot_ensemble is not None else ensemble_in_effect(model)
    rows = [
        {"path": p.source, "labels": p.labels, "probabilities": p.scores, "zero_shot_ensemble": ensemble}
        for p in predictions
    ]
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
    """`dpt-peft visualize`: the PNGs written (flags: `parsers.visualize_parser`)."""
    from ..data.images import open_rgb
    from ..integrations.visualize import class_aware_attention, nearest_context_tokens
    from ..utils.plots import save_attention_figure

    parser = visualize_parser()
    args = parser.parse_args(argv)
    _check_positive(parser, args, "top_k")
    paths = expand_paths(args.images)
    figures = OutputFolder(args.output_dir)  # before any work: never an input photo or a PNG dpt_peft did not write
    names = dict(zip(map(str, paths), _figure_names([str(path) for path in paths])))  # fixed before any image is read
    figures.check(names.values(), "--overwrite_output_dir", args.overwrite_output_dir, inputs=paths)
    model, processor = _adapted_model(args)
    if args.context:
        for position, nearest in enumerate(nearest_context_tokens(model)):
            print(f"context {position}: " + ", ".join(f"{token} ({score:.2f})" for token, score in nearest))
    written = []
    for prediction in predict(model, paths, top_k=args.top_k, processor=processor):
        image = open_rgb(prediction.source)
        maps = [class_aware_attention(model, image, label, processor=processor) for label in prediction.labels]
        title = ", ".join(f"{label} {100 * s:.0f}%" for label, s in zip(prediction.labels, prediction.scores))
        draw = functools.partial(save_attention_figure, image, maps, title=title)
        written.append(str(figures.write(names[prediction.source], draw)))
    print(f"{len(written)} figures written to {args.output_dir}")
    return written


def ablation_main(argv: list[str] | None = None) -> dict | list[str]:
    """`dpt-peft ablation`: the results per method, or with --print_commands the train commands (flags:
    `parsers.ablation_parser`, then train's)."""
    from ..experiments.ablation import (
        ablation_commands,
        ablation_variants,
        check_report_target,
        method_results,
        report_paths,
        run_ablation,
        write_report,
    )
    from ..experiments.executors import GridRunsFailed

    args, extra = ablation_parser().parse_known_args(argv)
    markdown, figure = report_paths(args.output_dir, args.docs_dir)
    check_writable_dir(args.output_dir, "--output_dir")  # the runs' folder, also when the reports go elsewhere
    options, config_options = parse_given_flags(extra)
    variants = ablation_variants(args.methods, args.variant)  # checked before any run
    grid = (args.output_dir, tuple(args.seeds), options, config_options)
    if args.print_commands:
        return _print_commands(ablation_commands(*grid, variants=variants))
    check_report_target(markdown, figure, args.overwrite_reports, "--docs_dir" if args.docs_dir else "--output_dir")
    command = " ".join(["dpt-peft ablation", *(sys.argv[1:] if argv is None else argv)])
    try:
        results = run_ablation(*grid, executor=_executor(args), variants=variants)
    except GridRunsFailed as failed:
        if failed.finished:
            done = method_results(failed.finished)
            write_report(done.accuracies, markdown, figure, command, *grid[2:], done.costs, variants)
        raise
    write_report(results.accuracies, markdown, figure, command, *grid[2:], results.costs, variants)
    with open(markdown) as f:
        print(f.read())
    return results.accuracies


def benchmark_main(argv: list[str] | None = None) -> str | list[str]:
    """`dpt-peft benchmark`: the path of results.md, or with --print_commands the train commands (flags:
    `parsers.benchmark_parser`, then train's)."""
    from ..experiments.benchmark import GridSpec, benchmark, benchmark_commands

    args, extra = benchmark_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    options, config_options = parse_given_flags(extra)
    grid = GridSpec(
        protocol=args.protocol,
        data_root=args.data_root,
        output_dir=args.output_dir,
        datasets=args.datasets,
        shots=args.shots,
        seeds=args.seeds,
        methods=args.methods,
        variants=args.variant,
        model_name_or_path=args.model_name_or_path,
        options=options,
        config_options=config_options,
    )
    if args.print_commands:
        return _print_commands(benchmark_commands(grid))
    report = benchmark(
        grid,
        executor=_executor(args),
        confidence_interval=args.confidence_interval,
        overwrite_reports=args.overwrite_reports,
    )
    print(report.read_text())
    return str(report)


def _executor(args: argparse.Namespace):
    """The grid commands' --executor and its flags, as `ExecutorSpec`."""
    from ..experiments.executors import ExecutorSpec

    return ExecutorSpec(
        kind=args.executor,
        gpus=args.gpus,
        max_parallel=args.max_parallel,
        slurm_partition=args.slurm_partition,
        slurm_time_min=args.slurm_time_min,
        slurm_max_concurrent=args.slurm_max_concurrent,
        slurm_sbatch=dict(args.slurm_sbatch or ()),
    )


def _print_commands(commands: list[str]) -> list[str]:
    """--print_commands: one line per run still to train, then what completes the grid."""
    print("\n".join(commands) or "Every run of the grid is trained: nothing to print.")
    if commands:
        print("# run them from this folder (paths as given), then the same grid command without --print_commands:")
        print("# it evaluates and reports these runs, training nothing.")
    return commands


def data_main(argv: list[str] | None = None) -> bool:
    """`dpt-peft data check`: whether every dataset is complete (flags: `parsers.data_parsers`)."""
    from ..data.check import check_data

    args = data_parser().parse_args(argv)
    checks = check_data(args.data_root, args.datasets, args.skip_missing_images)
    print("\n".join(c.summary() for c in checks))
    if not all(c.ok for c in checks):
        raise SystemExit(1)
    return True


def export_main(argv: list[str] | None = None) -> dict:
    """`dpt-peft export`: what was written and how close it is to PyTorch (flags: `parsers.export_parser`)."""
    from ..data.datasets import read_class_names
    from ..integrations.export import export_adapter

    args = export_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for exporter in ("torch.onnx", "onnxscript"):  # notes on ops they skip (torchvision's, constant folding)
        logging.getLogger(exporter).setLevel(logging.ERROR)
    class_names = read_class_names(args.class_names_file) if args.class_names_file else args.class_names
    result = export_adapter(
        args.adapter,
        args.output_dir,
        class_names=class_names,
        model_name_or_path=args.model_name_or_path,
        format=args.format,
        dtype=args.dtype,
        opset=args.opset,
        output_image_embeds=args.output_image_embeds,
        check_images=args.check_images,
        overwrite_output_dir=args.overwrite_output_dir,
    )
    print(
        f"{result.model_file} serves {len(result.class_names)} classes; on {result.num_images} images its logits "
        f"differ from PyTorch's by at most {result.max_difference:.1e} of the logit scale (tolerance "
        f"{result.tolerance:.0e}). Wrote {', '.join(result.files)} to {args.output_dir}; README.md says how to run it."
    )
    return {"model_file": str(result.model_file), "class_names": result.class_names, "files": result.files}


COMMANDS: tuple[Command, ...] = (
    Command("train", build_parser, train_main),
    Command("evaluate", evaluate_parser, evaluate_main),
    Command("predict", predict_parser, predict_main),
    Command("visualize", visualize_parser, visualize_main),
    Command("export", export_parser, export_main),
    Command("ablation", ablation_parser, ablation_main),
    Command("benchmark", benchmark_parser, benchmark_main),
    Command("data", data_parser, data_main, {"check": data_check_parser}),
)


def main(argv: list[str] | None = None) -> None:
    """`dpt-peft <command> [flags]`; each command's own --help lists its flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {command.name: command for command in COMMANDS}
    if not argv or argv[0] not in commands:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print(overview(COMMANDS), end="", file=sys.stdout if asked else sys.stderr)
        raise SystemExit(0 if asked else 2)
    sys.argv[0] = f"dpt-peft {argv[0]}"
    flags = argv[1:]
    verbose = "--verbose" in flags  # a refusal is one line (what, why, the fix); --verbose adds the traceback
    if argv[0] != "train":  # train's own --verbose also sets its log level
        flags = [flag for flag in flags if flag != "--verbose"]
    run_command(commands[argv[0]].run, flags, verbose)


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


def _adapted_model(args: argparse.Namespace):
    from ..data.datasets import read_class_names

    class_names = read_class_names(args.class_names_file) if args.class_names_file else None
    return load_adapted_model(args.adapter, args.model_name_or_path, class_names)
