"""Contrastive pre-training of the toy CLIP, and where its weights come from.

The weights ship with the package (`dpt_peft/toy/assets/`, about 1.5 MB) so runs skip the ~3 minutes of
pre-training; `python -m dpt_peft.toy.pretrain --output_dir DIR` rebuilds them. Loading goes through
`dpt_peft.sources`, which maps the id `dpt-peft/toy-clip` to the shipped copy and never pre-trains.

What is reproducible: the same seed, torch version, thread count (`torch.get_num_threads()`, `OMP_NUM_THREADS`) and
CPU give the same weights bit for bit (tests/toy/test_pretrain_reproducibility.py), with the shipped tokenizer (a
freshly built one numbers some words differently, see `pretrain`). Another torch version, thread
count or CPU sums floating-point numbers in another order; over 900 steps of AdamW the small differences grow, so a
rebuild elsewhere gives other weights (every tensor differs) and other accuracies than the shipped copy, whose numbers
are the ones the README states. To compare runs, use the shipped weights; a rebuild is a different toy model.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from .shapes import IMAGE_SIZE, captions, render

ASSETS = Path(__file__).parent / "assets"
# What adapters trained on the toy CLIP record as their base model: a name, not this machine's install path.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# The toy towers' sizes, shared by the toy CLIP and the toy SigLIP (their configs add each family's own fields).
TOY_TEXT_TOWER = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4)
TOY_VISION_TOWER = dict(
    image_size=IMAGE_SIZE,
    patch_size=8,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
)
TOY_TEXT_CONTEXT = 16


def toy_clip_config(tokenizer: CLIPTokenizer) -> CLIPConfig:
    """About 375k parameters: vision 32 px, patch 8, width 64, 4 layers; text width 64, 3 layers, 16 positions."""
    return CLIPConfig(
        text_config=dict(
            **TOY_TEXT_TOWER,
            vocab_size=len(tokenizer),
            max_position_embeddings=TOY_TEXT_CONTEXT,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=TOY_VISION_TOWER,
        projection_dim=64,
    )


def image_processor():
    from transformers import CLIPImageProcessor  # imported here: without torchvision it logs a fallback notice

    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def to_pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalized float [B, 3, H, W], as the image processor would give."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (pixels - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def contrastive_loss(logits: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE where every pair with identical captions counts as positive."""
    same = torch.tensor([[a == b for b in texts] for a in texts], dtype=logits.dtype)
    targets = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def train_on_shapes(
    model: torch.nn.Module,
    tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
    pixels: Callable[[np.ndarray], torch.Tensor],
    loss_of: Callable[[torch.Tensor, list[str]], torch.Tensor],
    rng: np.random.Generator,
    steps: int,
    batch_size: int,
) -> None:
    """The toy recipe for any dual encoder: a fresh batch of shapes and captions each step, AdamW (lr 2e-3, weight
    decay 0.05), 50 linear warm-up steps then cosine; `loss_of(logits_per_image, captions)` is the family's loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    warmup = 50
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))),
    )
    start = time.time()
    for step in range(steps):
        batch = render(rng, batch_size)
        texts = captions(batch, rng)
        output = model(**tokenize(texts), pixel_values=pixels(batch.images))
        loss = loss_of(output.logits_per_image, texts)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.time() - start:.0f}s", flush=True)


def pretrain(output_dir: str | os.PathLike, steps: int = 900, batch_size: int = 256, seed: int = 0) -> Path:
    """Pre-train the toy CLIP and save it (model, tokenizer, image processor) to `output_dir`.

    The shipped tokenizer is reused: `toy.tokenizer.build_clip_tokenizer` trains its BPE afresh, and the trainer
    orders tied merges differently from one call to the next (Rust hash maps), so a rebuilt tokenizer gives some words
    other ids, and the weights trained on them would differ from any other build's."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer = CLIPTokenizer.from_pretrained(ASSETS)
    model = CLIPModel(toy_clip_config(tokenizer))

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        return tokenizer(texts, padding=True, return_tensors="pt")

    train_on_shapes(model, tokenize, to_pixel_values, contrastive_loss, rng, steps, batch_size)
    return save_toy(output_dir, model, tokenizer, image_processor())


def save_toy(output_dir: str | os.PathLike, model, tokenizer, processor) -> Path:
    """A toy model folder as `from_pretrained` reads it: weights, tokenizer and image processor."""
    output_dir = Path(output_dir)
    for part in (model, tokenizer, processor):
        part.save_pretrained(output_dir)
    return output_dir


def pretraining_main(
    pretrain_toy: Callable[..., Path], name: str, output_dir: Path, steps: int, batch_size: int
) -> None:
    """`python -m dpt_peft.toy.<module>`: rebuild a toy model's shipped weights (or write them elsewhere)."""
    parser = argparse.ArgumentParser(description=f"Pre-train the toy {name} on synthetic shapes.")
    parser.add_argument("--output_dir", default=str(output_dir))
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch_size", type=int, default=batch_size)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pretrain_toy(args.output_dir, steps=args.steps, batch_size=args.batch_size, seed=args.seed)


def main() -> None:
    pretraining_main(pretrain, "CLIP", ASSETS, steps=900, batch_size=256)


if __name__ == "__main__":
    main()
