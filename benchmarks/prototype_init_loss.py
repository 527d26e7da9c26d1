"""Initial loss on the embedded default with SPT prototype init vs random init of the deep visual prompts.

    python benchmarks/prototype_init_loss.py --json prototype_init.json

The loss is the DPT training loss (no guidance) over the whole few-shot training set, before any step.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoImageProcessor, CLIPModel

import dpt_peft  # noqa: F401
from dpt_peft import DPTConfig, init_visual_prompts_from_prototypes
from dpt_peft.data.batching import ImageBatcher
from dpt_peft.data.datasets import load_task
from dpt_peft.sources import TOY_CLIP_ID, resolve
from dpt_peft.training.arguments import TOY_CONFIG_DEFAULTS, TrainArguments


def initial_loss(method: str, prototype_method: str | None, seed: int) -> float:
    """`prototype_method` None: the usual random normal init."""
    args = TrainArguments(seed=seed, report_to="none")
    data = load_task(args.data_spec, args.dataset)
    path = resolve(TOY_CLIP_ID)
    batcher = ImageBatcher(AutoImageProcessor.from_pretrained(path), "image", "label")
    loader = DataLoader(data.train, batch_size=len(data.train), collate_fn=batcher)
    torch.manual_seed(seed)
    model = get_peft_model(
        CLIPModel.from_pretrained(path),
        DPTConfig.for_method(method, class_names=data.class_names, **TOY_CONFIG_DEFAULTS),
    ).eval()
    if prototype_method is not None:
        init_visual_prompts_from_prototypes(model, loader, method=prototype_method, seed=seed)
    batch = next(iter(loader))
    with torch.no_grad():
        return model(**batch).loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for method in ("vpt", "dpt"):
        for init, prototype_method in (
            ("random normal", None),
            ("prototype kmeans", "kmeans"),
            ("prototype random", "random"),
            ("prototype mean_pool", "mean_pool"),
        ):
            losses = [initial_loss(method, prototype_method, s) for s in args.seeds]
            rows.append({"method": method, "init": init, "losses": losses, "mean": statistics.mean(losses)})
            print(
                f"{method:4} {init:20} initial loss {statistics.mean(losses):.3f}  (seeds: "
                + ", ".join(f"{v:.3f}" for v in losses)
                + ")",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
