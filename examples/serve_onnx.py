"""Classify images with an exported adapter using onnxruntime, numpy and Pillow: no torch, transformers or dpt_peft.

    dpt-peft export --adapter ADAPTER --output_dir served/
    python examples/serve_onnx.py --model_dir served/ photo.jpg more_photos/ [--top_k 5] [--json]

The preprocessing is the base model's image processor's, read from `preprocessor_config.json` and done here with PIL
and numpy exactly as transformers' PIL image processors do it (resize, centre crop, rescale, normalize), after
decoding each image as dpt_peft does (upright by its EXIF orientation, high bit depths scaled to 8 bits). The classes
are the ones `model.onnx` records in its metadata, so the predictions are those of `dpt-peft predict` with the same
adapter and classes. `--json` prints `dpt-peft predict`'s JSON lines (path, labels, probabilities) instead of a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
UNREADABLE = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
CLASS_NAMES_KEY = "dpt_peft.class_names"  # the metadata entry `dpt-peft export` writes


def class_names(model_dir: Path, session: onnxruntime.InferenceSession) -> list[str]:
    """The classes the model was exported for; a `class_names.json` beside it that lists others is refused."""
    recorded = session.get_modelmeta().custom_metadata_map.get(CLASS_NAMES_KEY)
    if recorded is None:
        sys.exit(f"{model_dir / 'model.onnx'} records no class names: export it with `dpt-peft export`.")
    names = json.loads(recorded)
    listed = model_dir / "class_names.json"
    if listed.is_file() and json.loads(listed.read_text(encoding="utf-8")) != names:
        sys.exit(
            f"{listed} lists other classes than model.onnx was exported for. The class list is part of the model "
            "(its class features are constants in the file): export again with `dpt-peft export --class_names ...`."
        )
    return names


def open_rgb(path: Path) -> Image.Image:
    """An upright 8-bit RGB image, 16-bit and float pixels scaled rather than clipped (dpt_peft's decoding)."""
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        full_scale = 65535.0 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(pixels / full_scale * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        scale = 255.0 if pixels.max(initial=0) <= 1.0 else 1.0
        image = Image.fromarray(np.clip(pixels * scale + 0.5, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def resized_size(width: int, height: int, size: dict) -> tuple[int, int]:
    """(width, height) after the processor's resize: the shorter side to `shortest_edge`, or a fixed size."""
    if set(size) == {"height", "width"}:
        return size["width"], size["height"]
    if set(size) != {"shortest_edge"}:
        sys.exit(
            f"preprocessor_config.json: size {size} is not one this example implements (shortest_edge, or "
            "height and width)."
        )
    short, long = sorted((width, height))
    new_long = int(size["shortest_edge"] * long / short)
    return (size["shortest_edge"], new_long) if width <= height else (new_long, size["shortest_edge"])


def preprocess(image: Image.Image, config: dict) -> np.ndarray:
    """`[3, H, W]` float32 pixel values, as the image processor of `config` computes them."""
    if config.get("do_resize", True):
        image = image.resize(resized_size(*image.size, config["size"]), resample=config.get("resample", 2))
    pixels = np.asarray(image)  # [H, W, 3] uint8
    if config.get("do_center_crop", False):
        crop_height, crop_width = config["crop_size"]["height"], config["crop_size"]["width"]
        height, width = pixels.shape[:2]
        if crop_height > height or crop_width > width:
            sys.exit(
                f"preprocessor_config.json: a crop of {crop_height} x {crop_width} from a {height} x {width} "
                "image (padding) is not one this example implements."
            )
        top, left = (height - crop_height) // 2, (width - crop_width) // 2
        pixels = pixels[top : top + crop_height, left : left + crop_width]
    pixels = pixels.astype(np.float32)
    if config.get("do_rescale", True):
        pixels = (pixels.astype(np.float64) * config["rescale_factor"]).astype(np.float32)
    if config.get("do_normalize", True):
        mean = np.array(config["image_mean"], dtype=np.float32)
        std = np.array(config["image_std"], dtype=np.float32)
        pixels = (pixels - mean) / std
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def image_paths(inputs: list[str]) -> list[Path]:
    """Files as given, folders expanded to the image files they hold (sorted), as `dpt-peft predict` does."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths.extend(sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif not item.exists():
            sys.exit(f"{item} does not exist.")
        else:
            paths.append(item)
    return paths


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="Image files and/or folders of images.")
    parser.add_argument("--model_dir", required=True, help="The folder `dpt-peft export` wrote.")
    parser.add_argument("--top_k", type=int, default=5, help="Classes reported per image.")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per run of the model.")
    parser.add_argument("--json", action="store_true", help="Print JSON lines (path, labels, probabilities).")
    args = parser.parse_args(argv)
    model_dir = Path(args.model_dir)
    session = onnxruntime.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = class_names(model_dir, session)
    config = json.loads((model_dir / "preprocessor_config.json").read_text(encoding="utf-8"))
    paths, rows = image_paths(args.images), []
    for start in range(0, len(paths), args.batch_size):
        batch, pixel_values = [], []
        for path in paths[start : start + args.batch_size]:
            try:
                pixel_values.append(preprocess(open_rgb(path), config))
            except UNREADABLE as err:
                print(f"Skipping {path}: not a readable image ({err})", file=sys.stderr)
                continue
            batch.append(path)
        if not batch:
            continue
        logits = session.run(["logits"], {"pixel_values": np.stack(pixel_values)})[0]
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=-1, keepdims=True)
        for path, row in zip(batch, probabilities):
            best = np.argsort(-row, kind="stable")[: min(args.top_k, len(names))]
            rows.append({"path": str(path), "labels": [names[i] for i in best], "probabilities": row[best].tolist()})
    for row in rows:
        ranked = ", ".join(f"{label} {100 * p:.1f}%" for label, p in zip(row["labels"], row["probabilities"]))
        print(json.dumps(row) if args.json else f"{row['path']}  {ranked}")
    return rows


if __name__ == "__main__":
    main()
