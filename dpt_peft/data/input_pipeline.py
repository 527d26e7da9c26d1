"""Feeding the accelerator: decode each training image once, augment whole batches on the device, and load what
still needs decoding (test sets, datasets above the cache budget) in parallel workers.

Today's path (`data.ImageBatcher`) decodes every JPEG with PIL in the main process, every epoch. Here:

1. `DecodedImageCache.build` decodes each image ONE time to a uint8 square of side `cache_size_for(crop)`
   (256 for 224-pixel crops) and keeps the run's images in memory as one `[N, 3, S, S]` uint8 tensor. With a
   `cache_dir` each decoded square is also stored on disk under the sha256 of the image file's content (and S),
   so a second run, another few-shot seed or another task that shares images reads them back without decoding.
   Above `memory_budget_bytes` it returns None before decoding anything: the caller keeps a decoding loader.
2. `DeviceAugmenter` crops, flips, resizes and normalizes a uint8 batch on whatever device it is on, with
   per-sample draws seeded by (seed, epoch, sample index) exactly as `ImageBatcher` draws them.
3. `CachedImageDataset` + `collate_cached` make DataLoader batches of cached uint8 images, labels and indices.
4. `loader_kwargs`, `ReportingImageBatcher` and `SkipCounter` run decoding loaders in (persistent) worker
   processes: each unreadable image is still logged and counted once, in the main process, and workers crop by
   the current epoch.

The cached image (what the augmentation sees)
---------------------------------------------
Each image's central square (side = its shorter side) is resampled straight to S x S with PIL's bicubic filter
(`Image.resize(box=...)` with the exact, fractional box: the same as resizing the shorter side to S and
center-cropping S, without rounding the longer side). S = ceil(crop * 8 / 7), 256 for 224: the usual
resize-256-crop-224 ratio, so the no-augmentation view downscales (256 -> 224) rather than upscales, at 196 KB
per image (16-shot ImageNet: 3.1 GB). Compared with today's crops of the original image:

- the strips outside the central square are gone (12.5% of each long side of a 4:3 image): crops never reach
  them, and box area fractions are relative to the square (8% of the square is 6% of a 4:3 image). On a 4:3
  original, draws of the wrong aspect are also rejected more often, so its crops average 44% of the image's area
  against 48% of the square (2000 draws; KS distance 0.10);
- a box is resampled from the 256-pixel square instead of the original pixels, so small boxes are upscaled
  from fewer pixels (an 8% box is ~72 cached pixels wide, ~106 of a 375-pixel-high original): slightly blurrier;
- the no-augmentation view resamples twice (original -> S -> crop) instead of once (original -> crop). Against
  the image processor on the original JPEGs (benchmarks/bench_input.py): mean 1.4 levels of 255, 99th
  percentile 12, max 54 at the sharpest edges. About half of it is the processor's own rounding of the longer
  side (500 x 375 -> int(224 * 500 / 375) = 298 x 224); square originals differ by the double resampling only.

On an S x S image the device path reproduces `ImageBatcher` itself: the same crop boxes and flips for the same
(seed, epoch, index), PIL's bicubic coefficients (a = -0.5, widened by the downscale factor as PIL and
`antialias=True` do, taking pixels just outside the box into the filter as PIL does) and PIL's rounding to 8 bits
after each pass; pixels agree within 1/255 (tested). On CUDA, enabling TF32 matmuls would add rounding
differences of about one level.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from PIL import Image as PILImage
from torch.utils.data import DataLoader

from .datasets import ImageBatcher, decode_image_value, undecoded
from .images import UNREADABLE_IMAGE_ERRORS

logger = logging.getLogger(__name__)

CACHE_FORMAT = "v1"  # bump when the decoded squares change (resampling, layout)
DEFAULT_MEMORY_BUDGET = 4 * 2**30  # bytes of decoded images per process; 16-shot ImageNet at 256 px takes 3.1 GB
SKIPPED_KEY = "skipped"
RATIO = (3 / 4, 4 / 3)


def cache_size_for(crop_size: int) -> int:
    """Side of the cached squares for `crop_size` crops: ceil(crop * 8 / 7), 256 for 224."""
    return math.ceil(crop_size * 8 / 7)


def processor_crop_size(processor) -> int:
    """The model's input side, read from its image processor as `ImageBatcher.crop_size` reads it."""
    crop = getattr(processor, "crop_size", None) or {}
    return int(crop.get("height") or processor.size.get("shortest_edge"))


def default_cache_dir() -> Path:
    """$DPT_PEFT_CACHE, else $XDG_CACHE_HOME/dpt_peft or ~/.cache/dpt_peft; decoded images go in `decoded/`."""
    root = os.environ.get("DPT_PEFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dpt_peft"
    )
    return Path(root) / "decoded"


# ----------------------------------------------------------------------------------------------------------------
# 1. Decode once


def to_cached_square(image: PILImage.Image, size: int) -> np.ndarray:
    """An RGB image's central square resampled to `size` x `size` (PIL bicubic), as uint8 [3, size, size]."""
    width, height = image.size
    side = min(width, height)
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    square = image.resize((size, size), PILImage.BICUBIC, box=box)
    return np.ascontiguousarray(np.asarray(square, dtype=np.uint8).transpose(2, 0, 1))


def _where(value) -> str:
    """How a bad image is named in logs and counts: its path, as `ImageBatcher` names it."""
    return str(value.get("path") if isinstance(value, dict) else value)


def _content_key(value) -> str:
    """sha256 of a `datasets` image value's content: its bytes, or its file's (read here; OSError when missing or
    unreadable). A PIL image is hashed by mode, size and pixels."""
    if isinstance(value, PILImage.Image):
        digest = hashlib.sha256(f"{value.mode}:{value.size}:".encode())
        digest.update(value.tobytes())
        return digest.hexdigest()
    data = value.get("bytes")
    if data:
        return hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256()
    with open(value["path"], "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _decode_square(source, size: int) -> tuple[torch.Tensor | None, str | None]:
    """(uint8 [3, size, size], None), or (None, "Error: message") for an unreadable image."""
    try:
        return torch.from_numpy(to_cached_square(decode_image_value(source), size)), None
    except (*UNREADABLE_IMAGE_ERRORS, KeyError) as err:
        return None, f"{type(err).__name__}: {err}"


class _DecodeJobs(torch.utils.data.Dataset):
    """The images a cache build must decode, for a DataLoader (optionally with workers)."""

    def __init__(self, sources: list, size: int):
        self.sources, self.size = sources, size

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        return (i, *_decode_square(self.sources[i], self.size))


def _as_list(batch: list) -> list:
    return batch


@dataclass
class DecodedImageCache:
    """A dataset's readable images decoded once: uint8 `[N, 3, size, size]`, row `i` holding dataset row `rows[i]`.

    `skipped` names each unreadable image once (by path), as `ImageBatcher.skipped` does; `decoded` and `reused`
    count the images this build decoded and read back from `cache_dir`.
    """

    pixels: torch.Tensor
    rows: list[int]
    size: int
    skipped: list[str] = field(default_factory=list)
    decoded: int = 0
    reused: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    @staticmethod
    def nbytes_for(num_images: int, size: int) -> int:
        """Memory the decoded images of `num_images` images take at side `size`."""
        return num_images * 3 * size * size

    @classmethod
    def build(
        cls,
        dataset: Dataset,
        image_column: str,
        size: int,
        cache_dir: str | os.PathLike | None = None,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
        num_workers: int = 0,
    ) -> DecodedImageCache | None:
        """Decode every image of `dataset` once (None, before decoding anything, when they would take more than
        `memory_budget_bytes`: keep a decoding loader then).

        With `cache_dir`, each square is stored as `<cache_dir>/v1-s<size>/<sha[:2]>/<sha256>.u8` (raw uint8
        [3, size, size], written atomically) and read back instead of decoded; an unreadable image leaves a
        `.bad` note so later builds skip it without decoding it again (not for PIL's decompression-bomb limit,
        which is a setting). `num_workers` > 0 decodes the missing images in DataLoader worker processes.
        """
        need = cls.nbytes_for(len(dataset), size)
        if need > memory_budget_bytes:
            logger.info(
                "Decoded images of %d images would take %.2f GB, over the %.2f GB budget; decoding every epoch.",
                len(dataset),
                need / 1e9,
                memory_budget_bytes / 1e9,
            )
            return None
        store = _Store(Path(cache_dir) / f"{CACHE_FORMAT}-s{size}") if cache_dir is not None else None
        count = len(dataset)
        names: list[str] = []  # how each row is named if it is unreadable
        # Filled through NumPy: single-threaded copies (an OpenMP team's barrier spins cost more than these).
        pixels = np.empty((count, 3, size, size), dtype=np.uint8)
        ok = np.zeros(count, dtype=bool)
        failures: dict[int, str] = {}  # row -> why it is unreadable
        jobs: dict[str, list[int]] = {}  # content key -> the rows with that content (decoded once)
        sources: dict[str, object] = {}  # content key -> the value to decode, for the keys not in the store
        reused = 0
        for position, value in enumerate(undecoded(dataset, image_column)[image_column]):
            names.append(_where(value))
            try:
                key = _content_key(value)
            except (OSError, KeyError, TypeError) as err:
                failures[position] = f"{type(err).__name__}: {err}"
                continue
            if key in jobs:
                jobs[key].append(position)
                continue
            if store is not None and (reason := store.bad_reason(key)) is not None:
                failures[position] = reason
                continue
            jobs[key] = [position]
            if store is not None and store.read(key, pixels[position]):
                ok[position] = True
                reused += 1
            else:
                sources[key] = value
        keys = list(sources)
        loader = DataLoader(
            _DecodeJobs([sources[k] for k in keys], size),
            batch_size=8,
            collate_fn=_as_list,
            **loader_kwargs(min(num_workers, len(keys)), persistent_workers=False, pin_memory=False),
        )
        for results in loader:
            for i, square, reason in results:
                first = jobs[keys[i]][0]
                if square is None:
                    failures.update((position, reason) for position in jobs[keys[i]])
                    if store is not None and not reason.startswith("DecompressionBombError"):  # a setting
                        store.write(keys[i], ".bad", reason.encode())
                    continue
                if store is not None:
                    store.write(keys[i], ".u8", square.numpy().tobytes())
                pixels[first] = square.numpy()
                ok[first] = True
        for positions in jobs.values():  # rows sharing content with the first one
            if ok[positions[0]]:
                for position in positions[1:]:
                    pixels[position] = pixels[positions[0]]
                    ok[position] = True
        skipped: list[str] = []
        for position in sorted(failures):  # in row order, each named once
            if names[position] not in skipped:
                skipped.append(names[position])
                logger.warning("Skipping unreadable image %s (%s)", names[position], failures[position])
        rows = np.flatnonzero(ok).tolist()
        if len(rows) < count:
            pixels = pixels[rows]  # a copy without the unreadable rows
        return cls(torch.from_numpy(pixels), rows, size, skipped, decoded=len(keys), reused=reused)


class _Store:
    """Decoded squares on disk, one file per content key: `<root>/<key[:2]>/<key>.u8`, or `.bad` holding why the
    image is unreadable. Files are written to a temporary name and renamed, so a reader (another process, a later
    run after a crash) never sees half of one. The store is only a speed-up: when it cannot be written (read-only,
    full disk) the build warns once and goes on without it."""

    def __init__(self, root: Path):
        self.root, self.writable = root, True

    def _path(self, key: str, suffix: str) -> Path:
        return self.root / key[:2] / f"{key}{suffix}"

    def bad_reason(self, key: str) -> str | None:
        try:
            return self._path(key, ".bad").read_text()
        except OSError:
            return None

    def read(self, key: str, out: np.ndarray) -> bool:
        """Fill `out` from the stored square; False when there is none (or a truncated one)."""
        try:
            with open(self._path(key, ".u8"), "rb") as f:
                read = f.readinto(memoryview(out).cast("B"))
                return read == out.size and not f.read(1)
        except OSError:
            return False

    def write(self, key: str, suffix: str, data: bytes) -> None:
        if not self.writable:
            return
        path = self._path(key, suffix)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_bytes(data)
            os.replace(temporary, path)
        except OSError as err:
            self.writable = False
            logger.warning("Cannot write the decoded-image cache %s (%s); going on without storing.", self.root, err)


# ----------------------------------------------------------------------------------------------------------------
# 2. Augment on the device


def draw_crop_box(
    width: int, height: int, rng: np.random.Generator, min_scale: float = 0.08, ratio: tuple = RATIO
) -> tuple[int, int, int, int]:
    """(left, top, width, height) of an Inception-style crop: the draws of `data.random_resized_crop`, in order
    (10 attempts at area `min_scale`-1 and log-uniform aspect `ratio`, then the centered square)."""
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
    `np.random.default_rng([seed, epoch, index])` (the draws `ImageBatcher` makes, so a resumed run sees the same
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
            rng = np.random.default_rng([self.seed, epoch, int(index)])
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


# ----------------------------------------------------------------------------------------------------------------
# 3. Cached batches


class CachedImageDataset(torch.utils.data.Dataset):
    """Samples `(uint8 [3, S, S], label, index)` of a `DecodedImageCache`. `labels` and `indices` are per row of the
    dataset the cache was built from (`indices`: the `__index__` that seeds augmentation; default the row)."""

    def __init__(self, cache: DecodedImageCache, labels: Sequence[int], indices: Sequence[int] | None = None):
        self.cache = cache
        self.labels = [int(labels[row]) for row in cache.rows]
        self.indices = [int(indices[row]) if indices is not None else row for row in cache.rows]

    @classmethod
    def from_dataset(cls, cache: DecodedImageCache, dataset: Dataset, label_column: str) -> CachedImageDataset:
        """Labels from `label_column`, indices from `__index__` (`data.with_index`) when the dataset has it."""
        indices = dataset["__index__"] if "__index__" in dataset.column_names else None
        return cls(cache, dataset[label_column], indices)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.cache.pixels[i], self.labels[i], self.indices[i]


def collate_cached(samples: list[tuple[torch.Tensor, int, int]]) -> dict:
    """{"images": uint8 [B, 3, S, S], "labels": long [B], "indices": list of ints}. The indices stay a Python list so
    that Accelerate leaves them on the host: drawing the boxes then needs no device-to-host copy (a sync). The images
    are gathered by NumPy in this thread: a few MB need no OpenMP team, whose barrier spins burn CPU on a busy host."""
    images, labels, indices = zip(*samples)
    return {
        "images": torch.from_numpy(np.stack([image.numpy() for image in images])),
        "labels": torch.tensor(labels, dtype=torch.long),
        "indices": list(indices),
    }


# ----------------------------------------------------------------------------------------------------------------
# 4. Parallel decoding loaders


def default_num_workers(local_processes: int = 1) -> int:
    """min(8, usable CPUs - 1), shared among the processes of this machine (one per GPU under Accelerate)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, (cpus - 1) // max(1, local_processes)))


def loader_kwargs(
    num_workers: int | None = None,
    *,
    persistent_workers: bool = True,
    prefetch_factor: int = 4,
    local_processes: int = 1,
    pin_memory: bool | None = None,
) -> dict:
    """DataLoader keyword arguments for a decoding loader: `num_workers` (default `default_num_workers`),
    `pin_memory` (default: when CUDA is available), and with workers `persistent_workers` and `prefetch_factor`.

    A persistent worker keeps the copy of the collate it started with: a training collate that reads a per-epoch
    attribute must share it (`ReportingImageBatcher` keeps `epoch` in shared memory), or run with
    `persistent_workers=False` (`ImageBatcher`): workers then start at each epoch's `iter(loader)`, copying the
    collate as it is then, at the cost of a start per epoch.
    """
    workers = default_num_workers(local_processes) if num_workers is None else int(num_workers)
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    kwargs: dict = {"num_workers": workers, "pin_memory": pin}
    if workers > 0:
        kwargs.update(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor)
    return kwargs


@dataclass
class ReportingImageBatcher(ImageBatcher):
    """`ImageBatcher` for DataLoader workers.

    - Its batches also carry the images they skipped: `batch["skipped"]` is a list of (path, "Error: message").
      A worker's own `skipped` list dies with the worker; these reach the main process, where `SkipCounter.take`
      counts and logs each image once. A batch of unreadable images only is `{"skipped": [...]}`.
    - `epoch` lives in shared memory, so persistent workers (which keep the copy of the collate they started
      with) crop by the epoch the main process sets, not by the one they started in.
    """

    @property
    def epoch(self) -> int:
        return int(self._shared_epoch.item())

    @epoch.setter
    def epoch(self, value: int) -> None:
        if "_shared_epoch" not in self.__dict__:  # the dataclass __init__ sets the first value
            self._shared_epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._shared_epoch.fill_(int(value))

    def __call__(self, rows: list[dict]) -> dict:
        self._batch_skipped: list[tuple[str, str]] = []
        batch = super().__call__(rows) or {}
        batch[SKIPPED_KEY] = self._batch_skipped
        return batch

    def _skip(self, value, err: Exception) -> None:  # recorded here, logged once by the main process's SkipCounter
        where = _where(value)
        if where not in self.skipped:
            self.skipped.append(where)
        self._batch_skipped.append((where, f"{type(err).__name__}: {err}"))


class SkipCounter:
    """The unreadable images of a run, each counted and logged once, in the process that owns it."""

    def __init__(self, paths: Sequence[str] = ()):
        self.skipped: list[str] = list(dict.fromkeys(paths))
        self._seen = set(self.skipped)

    def __len__(self) -> int:
        return len(self.skipped)

    def add(self, path: str, reason: str | None = None, log: bool = True) -> bool:
        """Record `path`; True (and a warning) the first time."""
        if path in self._seen:
            return False
        self._seen.add(path)
        self.skipped.append(path)
        if log:
            logger.warning("Skipping unreadable image %s (%s)", path, reason or "unreadable")
        return True

    def update(self, paths: Sequence[str]) -> None:
        """Record images already logged elsewhere (e.g. `DecodedImageCache.skipped`)."""
        for path in paths:
            self.add(path, log=False)

    def take(self, batch: dict | None) -> dict | None:
        """Pop and record `batch["skipped"]`; the batch without it, or None when no image of it was readable."""
        if batch is None:
            return None
        for path, reason in batch.pop(SKIPPED_KEY, ()):
            self.add(path, reason)
        return batch if "pixel_values" in batch else None
