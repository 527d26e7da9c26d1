"""Training augmentation, drawn the same way on both paths: PIL crops of decoded images (`random_resized_crop`, used by
`batching.ImageBatcher`) and batched crops of cached uint8 squares on the device (`DeviceAugmenter`).
How the two paths relate and how exact the device path is: docs/input_pipeline.md."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image as PILImage

RATIO = (3 / 4, 4 / 3)


def processor_crop_size(processor) -> int:
    """The model's input side, read from its image processor: CLIP's crops to `crop_size`, SigLIP's resizes to
    `size={"height", "width"}` without a crop."""
    crop = getattr(processor, "crop_size", None) or {}
    return int(crop.get("height") or processor.size.get("shortest_edge") or processor.size["height"])


def crop_draws(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample's crop and flip in one epoch: a resumed run draws what an uninterrupted one did,
    whichever batch the sample lands in."""
    return np.random.default_rng([seed, epoch, int(index)])


def random_resized_crop(
    image: PILImage.Image, size: int, rng: np.random.Generator, min_scale: float = 0.08
) -> PILImage.Image:
    """Inception-style crop (`draw_crop_box`) resized to `size` with PIL's bicubic filter."""
    left, top, width, height = draw_crop_box(*image.size, rng, min_scale)
    return image.resize((size, size), PILImage.BICUBIC, box=(left, top, left + width, top + height))


def draw_crop_box(
    width: int, height: int, rng: np.random.Generator, min_scale: float = 0.08, ratio: tuple = RATIO
) -> tuple[int, int, int, int]:
    """(left, top, width, height) of an Inception-style crop, as in CoOp/DPT training: 10 attempts at area
    `min_scale`-1 and log-uniform aspect `ratio`, then the centered square. Both augmentation paths draw their boxes
    here, so a resumed run, and either path, sees the same crops for the same (seed, epoch, index)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
            return int(left), int(top), w, h
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, (width + side) // 2 - left, (height + side) // 2 - top


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5), zero outside |x| < 2."""
    a = -0.5
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_weights(starts: torch.Tensor, lengths: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """[B, out_size, in_size] matrices resampling the spans [start, start + length) of a line of `in_size` pixels to
    `out_size` pixels, with the coefficients of PIL's bicubic `resize(box=...)`: the kernel widened by the
    downscale factor (antialiasing), centered on each output pixel's center, cut at the image's edges (not the
    box's) and normalized to sum 1. Each row has at most `taps` nonzero weights; they are computed compactly and
    scattered (a span is at most the line, so `taps` has a static bound: no device-to-host sync)."""
    scale = lengths / out_size  # [B]
    filter_scale = scale.clamp(min=1.0)
    centers = starts.unsqueeze(1) + (torch.arange(out_size, device=starts.device) + 0.5) * scale.unsqueeze(1)
    first = torch.floor(centers - 2.0 * filter_scale.unsqueeze(1) + 0.5).clamp(min=0)  # PIL's xmin
    taps = 2 * math.ceil(2.0 * max(1.0, in_size / out_size)) + 1
    positions = first.unsqueeze(2) + torch.arange(taps, device=starts.device)  # [B, out, taps]
    weights = _bicubic((positions + 0.5 - centers.unsqueeze(2)) / filter_scale.view(-1, 1, 1))
    weights = torch.where(positions < in_size, weights, torch.zeros_like(weights))  # PIL's xmax
    weights = weights / weights.sum(dim=2, keepdim=True)
    dense = torch.zeros(len(starts), out_size, in_size + taps, device=starts.device, dtype=weights.dtype)
    return dense.scatter_(2, positions.long(), weights)[:, :, :in_size]


class DeviceAugmenter:
    """Training augmentation of uint8 `[B, 3, H, W]` batches (the cached squares) on their own device.

    `train=True`: per sample, `draw_crop_box` and a flip with probability 0.5 from
    `crop_draws(seed, epoch, index)` (the draws `ImageBatcher` makes, so a resumed run sees the same
    crops and the batch a sample lands in does not matter), the box resized to `crop_size` (PIL-exact bicubic, as
    two batched matrix products), then CLIP's normalization. `train=False`: the processor's evaluation view,
    the shorter side resized to `crop_size` and center-cropped. Returns float32 `[B, 3, crop_size, crop_size]`.

    Only the boxes are drawn on the host (microseconds per sample); the pixels never leave the device.
    """

    def __init__(
        self,
        crop_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        train: bool = True,
        seed: int = 0,
        min_scale: float = 0.08,
        ratio: tuple[float, float] = RATIO,
    ):
        self.crop_size, self.train, self.seed, self.min_scale, self.ratio = crop_size, train, seed, min_scale, ratio
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def from_processor(cls, processor, **kwargs) -> DeviceAugmenter:
        """Crop size, mean and std of a CLIP image processor."""
        return cls(processor_crop_size(processor), processor.image_mean, processor.image_std, **kwargs)

    def draws(self, width: int, height: int, epoch: int, indices: Sequence[int]) -> np.ndarray:
        """[B, 5] float64: left, top, width, height of each sample's box and 1.0 where it is flipped."""
        out = np.empty((len(indices), 5))
        for row, index in enumerate(indices):
            rng = crop_draws(self.seed, epoch, index)
            box = draw_crop_box(width, height, rng, self.min_scale, self.ratio)
            out[row] = (*box, rng.random() < 0.5)
        return out

    def center_draws(self, width: int, height: int, count: int) -> np.ndarray:
        """The evaluation view as boxes: the central square (fractional, as resizing the shorter side and
        center-cropping takes it), no flip."""
        side = min(width, height)
        return np.tile([(width - side) / 2, (height - side) / 2, side, side, 0.0], (count, 1))

    def __call__(
        self, images: torch.Tensor, epoch: int = 0, indices: Sequence[int] | torch.Tensor | None = None
    ) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"DeviceAugmenter takes uint8 [B, 3, H, W] images, got {images.dtype} {tuple(images.shape)}."
            )
        batch, _, height, width = images.shape
        if self.train:
            if indices is None:
                raise ValueError("Training augmentation needs each sample's index (the `indices` of the batch).")
            indices = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
            if len(indices) != batch:
                raise ValueError(f"{len(indices)} indices for a batch of {batch} images.")
            draws = self.draws(width, height, epoch, indices)
        else:
            draws = self.center_draws(width, height, batch)
        return self.apply(images, draws)

    def apply(self, images: torch.Tensor, draws: np.ndarray) -> torch.Tensor:
        """Crop, flip, resize and normalize `images` by `draws` (see `draws`), in float32 even under autocast
        (bf16 products would be off by a level or two of 255)."""
        if torch.amp.is_autocast_available(images.device.type):
            with torch.autocast(images.device.type, enabled=False):
                return self._apply(images, draws)
        return self._apply(images, draws)

    def _apply(self, images: torch.Tensor, draws: np.ndarray) -> torch.Tensor:
        device = images.device
        params = torch.from_numpy(draws.astype(np.float32))
        if device.type == "cuda":
            params = params.pin_memory().to(device, non_blocking=True)
        else:
            params = params.to(device)
        left, top, box_w, box_h, flip = params.unbind(1)
        size = self.crop_size
        across = resample_weights(left, box_w, images.shape[3], size)  # [B, size, W]
        across = torch.where(flip.view(-1, 1, 1) > 0, across.flip(1), across)  # a flip reverses output columns
        down = resample_weights(top, box_h, images.shape[2], size)  # [B, size, H]
        batch, _, height, width = images.shape
        # Rows ordered (y, channel): the horizontal pass is then one batched product over all rows, and its
        # output is already the (y, channel * x) matrix the vertical pass multiplies. No broadcast copies.
        pixels = images.permute(0, 2, 1, 3).to(torch.float32, memory_format=torch.contiguous_format)
        # PIL's order: horizontal pass, 8-bit rounding, vertical pass, 8-bit rounding (in place).
        pixels = torch.bmm(pixels.view(batch, height * 3, width), across.transpose(1, 2))  # [B, H * 3, size]
        pixels.add_(0.5).floor_().clamp_(0, 255)
        pixels = torch.bmm(down, pixels.view(batch, height, 3 * size))  # [B, size, 3 * size]
        pixels.add_(0.5).floor_().clamp_(0, 255)
        scale, shift = (1 / (255.0 * self.std)).to(device), (self.mean / self.std).to(device)
        out = torch.empty((batch, 3, size, size), device=device)
        torch.mul(pixels.view(batch, size, 3, size).permute(0, 2, 1, 3), scale, out=out)
        return out.sub_(shift)  # (x / 255 - mean) / std
