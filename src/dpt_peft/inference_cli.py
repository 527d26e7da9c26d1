"""Entry points of `examples/predict.py` and `examples/visualize.py`."""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Optional

import torch
from peft import PeftModel
from transformers import CLIPModel

from .inference import expand_paths, predict


def load_adapted_model(model_name_or_path: Optional[str], adapter: str, class_names_file: Optional[str] = None):
    """Base CLIP + adapter, on the GPU when there is one, with an optional new label space."""
    from .toy.pretrain import toy_clip_path

    model = PeftModel.from_pretrained(CLIPModel.from_pretrained(model_name_or_path or toy_clip_path()), adapter)
    if class_names_file:
        with open(class_names_file, encoding="utf-8") as f:
            model.set_class_names([line.strip() for line in f if line.strip()])
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="Image files and/or directories of images.")
    parser.add_argument("--adapter", required=True, help="Adapter directory or Hub id.")
    parser.add_argument("--model_name_or_path", default=None, help="Base CLIP (default: the toy CLIP).")
    parser.add_argument("--class_names_file", default=None, help="New label space, one class name per line.")
    parser.add_argument("--top_k", type=int, default=5)


def predict_main(argv: Optional[list[str]] = None) -> list[dict]:
    """Top-k classes of each image: a table on stdout and JSON lines in --output."""
    parser = argparse.ArgumentParser(description=predict_main.__doc__)
    _common_arguments(parser)
    parser.add_argument("--output", default="predictions.jsonl", help="JSON lines: path, labels, probabilities.")
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    paths = expand_paths(args.images)
    model = load_adapted_model(args.model_name_or_path, args.adapter, args.class_names_file)
    predictions = predict(model, paths, top_k=args.top_k, batch_size=args.batch_size, progress=True)
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


def visualize_main(argv: Optional[list[str]] = None) -> list[str]:
    """Class-aware attention maps of each image's top classes (one PNG per image), and with --context the
    vocabulary tokens nearest to each learned context vector."""
    from PIL import Image

    from .visualize import class_aware_attention, nearest_context_tokens, save_attention_figure

    parser = argparse.ArgumentParser(description=visualize_main.__doc__)
    _common_arguments(parser)
    parser.set_defaults(top_k=3)
    parser.add_argument("--output_dir", default="outputs/attention")
    parser.add_argument("--context", action="store_true", help="Print the nearest tokens of the learned context.")
    args = parser.parse_args(argv)
    model = load_adapted_model(args.model_name_or_path, args.adapter, args.class_names_file)
    if args.context:
        for position, nearest in enumerate(nearest_context_tokens(model)):
            print(f"context {position}: " + ", ".join(f"{token} ({score:.2f})" for token, score in nearest))
    os.makedirs(args.output_dir, exist_ok=True)
    written = []
    for prediction in predict(model, expand_paths(args.images), top_k=args.top_k):
        image = Image.open(prediction.source).convert("RGB")
        maps = [class_aware_attention(model, image, label) for label in prediction.labels]
        path = os.path.join(args.output_dir, os.path.splitext(os.path.basename(prediction.source))[0] + ".png")
        title = ", ".join(f"{label} {100 * s:.0f}%" for label, s in zip(prediction.labels, prediction.scores))
        save_attention_figure(image, maps, path, title)
        written.append(path)
    print(f"{len(written)} figures written to {args.output_dir}")
    return written
