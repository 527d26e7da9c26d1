"""Parameter count and file size of DPT adapters on real CLIP shapes (random weights built from configs).

python benchmarks/adapter_size.py --json adapter_size.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from model_shapes import SHAPES  # noqa: E402  (sibling module; benchmarks run as scripts)
from peft import get_peft_model
from transformers import CLIPConfig, CLIPModel

import dpt_peft  # noqa: F401
from dpt_peft import DPTConfig
from dpt_peft.toy.tokenizer import build_clip_tokenizer

NAMES = {"ViT-B/16": "vit-b16", "ViT-L/14": "vit-l14"}


def measure(shape: str, num_classes: int, method: str, tokenizer_dir: str) -> dict:
    clip = CLIPModel(CLIPConfig(**SHAPES[NAMES[shape]]))
    names = [f"class {i}" for i in range(num_classes)]
    model = get_peft_model(clip, DPTConfig.for_method(method, class_names=names, tokenizer_name_or_path=tokenizer_dir))
    trainable, total = model.get_nb_trainable_parameters()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        size = os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))
    return {
        "shape": shape,
        "method": method,
        "num_classes": num_classes,
        "trainable_parameters": trainable,
        "base_parameters": total - trainable,
        "adapter_file_bytes": size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(NAMES), choices=list(NAMES))
    parser.add_argument("--num_classes", nargs="+", type=int, default=[10, 100, 1000])
    parser.add_argument("--methods", nargs="+", default=["coop", "vpt", "vpt_coop", "dpt"])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        build_clip_tokenizer(["class"]).save_pretrained(tokenizer_dir)
        rows = [measure(s, c, m, tokenizer_dir) for s in args.shapes for c in args.num_classes for m in args.methods]
    print(f"{'shape':9} {'method':9} {'classes':>7} {'trainable':>11} {'file MB':>8}")
    for r in rows:
        print(
            f"{r['shape']:9} {r['method']:9} {r['num_classes']:>7} {r['trainable_parameters']:>11,} "
            f"{r['adapter_file_bytes'] / 2**20:>8.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
