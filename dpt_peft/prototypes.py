"""Self-Prompt Tuning (arXiv 2402.02382): deep visual prompts initialized from the downstream data's tokens.

The frozen CLIP (adapter bypassed) runs over downstream images batch by batch on the model's device; the
patch tokens entering every vision layer that has deep prompts are kept in a reservoir sample of at most
`max_tokens_per_layer` tokens per layer (memory stays bounded however many images there are). Each layer's
prompts are then set from its pool: k-means centres (the paper's prototypes), randomly sampled tokens (the
released code's default), or window means of the patch sequence, sampled.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .peft_model import DPTPeftModel
from .utils.errors import UserInputError

PrototypeMethod = Literal["kmeans", "random", "mean_pool"]


def kmeans_plus_plus_init(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to squared distance."""
    first = torch.randint(len(points), (1,), generator=generator).item()
    centres = [points[first]]
    distances = (points - centres[0]).pow(2).sum(-1)
    for _ in range(1, k):
        probabilities = (
            distances / distances.sum() if distances.sum() > 0 else torch.full_like(distances, 1 / len(points))
        )
        index = torch.multinomial(probabilities.cpu(), 1, generator=generator).item()
        centres.append(points[index])
        distances = torch.minimum(distances, (points - points[index]).pow(2).sum(-1))
    return torch.stack(centres)


def lloyd(points: torch.Tensor, centres: torch.Tensor, iterations: int = 100, tolerance: float = 1e-7) -> torch.Tensor:
    """Lloyd iterations from `centres`; an empty cluster keeps its centre."""
    for _ in range(iterations):
        assignment = torch.cdist(points, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=len(centres)).unsqueeze(1)
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
        shift = (updated - centres).pow(2).sum()
        centres = updated
        if shift <= tolerance:
            break
    return centres


def kmeans(points: torch.Tensor, k: int, seed: int = 0, iterations: int = 100) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return lloyd(points, kmeans_plus_plus_init(points, k, generator), iterations)


class _Reservoir:
    """A uniform sample of at most `capacity` rows from a stream (Algorithm R, batch at a time)."""

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        self.capacity, self.generator, self.seen = capacity, generator, 0
        self.rows: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float().cpu()
        if self.rows is None:
            self.rows = rows[: self.capacity].clone()
            rows, self.seen = rows[self.capacity :], len(self.rows)
        elif len(self.rows) < self.capacity:
            room = self.capacity - len(self.rows)
            self.rows = torch.cat([self.rows, rows[:room]])
            rows, self.seen = rows[room:], self.seen + min(room, len(rows))
        if len(rows):
            positions = self.seen + torch.arange(1, len(rows) + 1)
            slots = (torch.rand(len(rows), generator=self.generator) * positions).long()
            keep = slots < self.capacity
            self.rows[slots[keep]] = rows[keep]
            self.seen += len(rows)


def _pixel_values(batch) -> torch.Tensor:
    if isinstance(batch, dict):
        return batch["pixel_values"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


def collect_layer_tokens(
    model: DPTPeftModel,
    dataloader: Iterable,
    layers: list[int],
    num_windows: int | None = None,
    max_images: int = 512,
    max_tokens_per_layer: int = 20_000,
    seed: int = 0,
) -> dict[int, torch.Tensor | None]:
    """Patch tokens (CLS and other prefix tokens removed, as the backbone says) entering each of the vision `layers`,
    run through the frozen model; with
    `num_windows`, each image's patch sequence is first averaged into that many windows."""
    generator = torch.Generator().manual_seed(seed)
    pools = {index: _Reservoir(max_tokens_per_layer, generator) for index in layers}
    device = next(model.parameters()).device
    images = 0

    def collect(index: int, tokens: torch.Tensor) -> None:
        patches = model.backbone.patch_tokens(tokens)
        if num_windows is not None:
            patches = F.adaptive_avg_pool1d(patches.transpose(1, 2).float(), num_windows).transpose(1, 2)
        pools[index].add(patches.reshape(-1, patches.shape[-1]))

    for batch in tqdm(dataloader, desc="prototype tokens", leave=False):
        if batch is None:
            continue
        pixel_values = _pixel_values(batch)[: max_images - images]
        model.frozen_layer_inputs(pixel_values.to(device), layers, collect)
        images += len(pixel_values)
        if images >= max_images:
            break
    return {index: pool.rows for index, pool in pools.items()}


def init_visual_prompts_from_prototypes(
    model: DPTPeftModel,
    dataloader: Iterable,
    method: PrototypeMethod = "kmeans",
    max_images: int = 512,
    max_tokens_per_layer: int = 20_000,
    seed: int = 0,
) -> dict[int, torch.Tensor]:
    """Set the active adapter's deep visual prompts from the downstream data (SPT); returns them per layer.

    Raises if a layer's pool holds fewer tokens than `num_visual_tokens` (give more images).
    """
    if method not in ("kmeans", "random", "mean_pool"):
        raise UserInputError(f"method={method!r}; use 'kmeans', 'random' or 'mean_pool'.")
    prompts_by_layer = model.visual_prompts()
    if not prompts_by_layer:
        raise UserInputError(
            f"Adapter {model.active_adapter!r} has no deep visual prompts (num_visual_tokens=0) to initialize."
        )
    num_prompts = next(iter(prompts_by_layer.values())).shape[0]
    windows = num_prompts if method == "mean_pool" else None
    pools = collect_layer_tokens(
        model, dataloader, list(prompts_by_layer), windows, max_images, max_tokens_per_layer, seed
    )
    generator = torch.Generator().manual_seed(seed)
    initialized = {}
    for index, parameter in prompts_by_layer.items():
        pool = pools[index]
        available = 0 if pool is None else len(pool)
        if available < num_prompts:
            raise UserInputError(
                f"Vision layer {index} collected {available} tokens, fewer than num_visual_tokens={num_prompts}; "
                "pass more images (max_images) or fewer prompts."
            )
        if method == "kmeans":
            prompts = kmeans(pool, num_prompts, seed=seed + index)
        else:
            prompts = pool[torch.randperm(available, generator=generator)[:num_prompts]]
        with torch.no_grad():
            parameter.copy_(prompts.to(parameter.device, parameter.dtype))
        initialized[index] = prompts
    return initialized
