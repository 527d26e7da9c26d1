"""Synthetic images of coloured shapes with captions: the world of the toy CLIP.

Pre-training captions always name a colour ("a small red circle on the left", "a blue ring"), so a
prompt naming only the shape ("a photo of a circle.") is unfamiliar to the toy CLIP: zero-shot is clearly
imperfect, and learning the prompt's wording is exactly what prompt tuning can fix. The downstream images
are shifted (textured background, pixel noise, colours partly off the pre-training palette), so the
task is not the pre-training distribution either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 220, 50),
    "purple": (150, 60, 200),
    "orange": (240, 140, 30),
    "white": (235, 235, 235),
    "cyan": (50, 210, 220),
}
SIZES = {"small": 5.0, "large": 8.5}
POSITIONS = {"left": (10, 16), "right": (22, 16), "top": (16, 10), "bottom": (16, 22), "center": (16, 16)}
IMAGE_SIZE = 32
VOCABULARY = [*SHAPES, *COLOURS, *SIZES, *POSITIONS, "a", "photo", "of", "the", "on", "an", "image", "shape"]


@dataclass(frozen=True)
class ShapeBatch:
    images: np.ndarray  # [B, 32, 32, 3] uint8
    shapes: np.ndarray  # [B] index into SHAPES
    colours: np.ndarray  # [B] the palette colour drawn (what pre-training captions name); see `fills`
    sizes: np.ndarray
    positions: np.ndarray
    fills: np.ndarray  # [B, 3] float: the colour each shape is painted (jittered, or repainted off the palette)


def nearest_colours(fills: np.ndarray) -> np.ndarray:
    """The index into COLOURS of the palette colour nearest (in RGB) to each of `fills` [B, 3]: what a shape's
    colour is called, also when the downstream shift repainted it off the palette."""
    palette = np.array(list(COLOURS.values()), dtype=float)
    return np.argmin(((np.asarray(fills, dtype=float)[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)


def shape_masks(shape: np.ndarray, dx: np.ndarray, dy: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Boolean masks [B, H, W] of each sample's shape, centred at the origin of (dx, dy)."""
    r = radius[:, None, None]
    distance = np.sqrt(dx**2 + dy**2)
    candidates = np.stack(
        [
            distance <= r,  # circle
            np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r,  # square
            (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2),  # triangle, apex up
            ((np.abs(dx) <= r / 3) & (np.abs(dy) <= r)) | ((np.abs(dy) <= r / 3) & (np.abs(dx) <= r)),  # cross
            np.abs(dx) + np.abs(dy) <= r,  # diamond
            (distance <= r) & (distance >= 0.55 * r),  # ring
        ]
    )
    return candidates[shape, np.arange(len(shape))]


def render(
    rng: np.random.Generator,
    count: int,
    shift: float = 0.0,
    shapes: np.ndarray | None = None,
    positions: np.ndarray | None = None,
) -> ShapeBatch:
    """Draw `count` images; `shift > 0` gives the downstream distribution: textured background, pixel noise and
    off-palette colours, growing with `shift` (1.0 is mild)."""
    shapes = rng.integers(len(SHAPES), size=count) if shapes is None else np.asarray(shapes)
    colours = rng.integers(len(COLOURS), size=count)
    sizes = rng.integers(len(SIZES), size=count)
    positions = rng.integers(len(POSITIONS), size=count) if positions is None else np.asarray(positions)
    centre = np.array(list(POSITIONS.values()), dtype=float)[positions] + rng.uniform(-1.5, 1.5, size=(count, 2))
    radius = np.array(list(SIZES.values()))[sizes] * rng.uniform(0.9, 1.1, size=count)
    grid = np.arange(IMAGE_SIZE, dtype=float) + 0.5
    dx = grid[None, None, :] - centre[:, 0, None, None]
    dy = grid[None, :, None] - centre[:, 1, None, None]
    mask = shape_masks(shapes, dx, dy, radius)

    palette = np.array(list(COLOURS.values()), dtype=float)[colours]
    palette = palette + rng.normal(0, 12, size=palette.shape)
    background = rng.uniform(0, 35, size=(count, 1, 1, 3)) * np.ones((1, IMAGE_SIZE, IMAGE_SIZE, 1))
    if shift:
        off_palette = rng.random(count) < min(0.3 * shift, 1.0)
        palette[off_palette] = rng.uniform(40, 240, size=(off_palette.sum(), 3))
        stripes = np.sin(grid[None, :, None] * rng.uniform(0.5, 1.5, (count, 1, 1)) + grid[None, None, :] * 0.7)
        background = background + 25 * shift * (stripes[..., None] + 1)
    images = np.where(mask[..., None], palette[:, None, None, :], background)
    if shift:
        images = images + rng.normal(0, 18 * shift, size=images.shape)
    return ShapeBatch(np.clip(images, 0, 255).astype(np.uint8), shapes, colours, sizes, positions, palette)


def captions(batch: ShapeBatch, rng: np.random.Generator) -> list[str]:
    """Pre-training captions; every one names the colour and the shape, some also the size or position."""
    colour_names, size_names, position_names = list(COLOURS), list(SIZES), list(POSITIONS)
    texts = []
    for shape, colour, size, position, style in zip(
        batch.shapes, batch.colours, batch.sizes, batch.positions, rng.integers(4, size=len(batch.shapes))
    ):
        words = ["a"] + ([size_names[size]] if style in (1, 3) else []) + [colour_names[colour], SHAPES[shape]]
        if style >= 2:
            words += ["on", "the", position_names[position]]
        texts.append(" ".join(words))
    return texts
