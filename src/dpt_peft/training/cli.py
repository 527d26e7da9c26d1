"""Entry points of the example scripts."""

from __future__ import annotations

import json
import logging
from typing import Optional

from .arguments import parse_args
from .trainer import train


def train_main(argv: Optional[list[str]] = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, overrides = parse_args(argv)
    return train(args, overrides)


def evaluate_main(argv: Optional[list[str]] = None) -> dict:
    """`examples/evaluate.py`: evaluate an adapter on a dataset split (optionally base-to-new)."""
    import argparse

    from ..toy.pretrain import toy_clip_path
    from .data import load_checked_split
    from .evaluation import evaluate_adapter

    parser = argparse.ArgumentParser(description=evaluate_main.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--adapter", required=True, help="Adapter directory or Hub id.")
    parser.add_argument("--model_name_or_path", default=None, help="Base CLIP (default: the toy CLIP).")
    parser.add_argument("--dataset", default="toy-position", help="Hub dataset, imagefolder, or toy task.")
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

    _, split, class_names = load_checked_split(args.dataset, args.split, args.image_column, args.label_column,
                                               args.class_names_file, args.seed)
    as_list = lambda text: [n.strip() for n in text.split(",")] if text else None  # noqa: E731
    report = evaluate_adapter(
        args.model_name_or_path or toy_clip_path(), args.adapter, split, class_names, args.image_column,
        args.label_column, args.output_dir, args.batch_size, as_list(args.base_classes), as_list(args.new_classes),
        args.base_to_new,
    )
    print(json.dumps({k: v for k, v in report.items() if k != "per_class_accuracy"}, indent=2))
    return report
