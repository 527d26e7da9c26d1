"""Decode each training image once: a run's images as one uint8 tensor in memory, also stored on disk by content so
other runs read them back, and the DataLoader pieces that batch them. Why the cached squares look as they do, and how
they differ from decoding the originals every epoch: docs/input_pipeline.md."""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL
import torch
from datasets import Dataset
from PIL import Image as PILImage
from PIL import ImageFile as PILImageFile
from torch.utils.data import DataLoader

from ..utils.write_policy import TEMPORARY_PREFIX
from .batching import INDEX_COLUMN, image_name, undecoded
from .cache_dir import default_cache_dir
from .images import (
    DECODER_VERSION,
    UNREADABLE_IMAGE_ERRORS,
    UPSCALED_SHORT_SIDE,
    decode_image_value,
    open_image_file,
)
from .loaders import loader_kwargs

logger = logging.getLogger(__name__)

CACHE_FORMAT = "v2"  # bump when the decoded squares change (resampling, layout); v2: a sha256 after each square
CHECKSUM_BYTES = 32
DEFAULT_MEMORY_BUDGET = 4 * 2**30  # bytes of decoded images per process; 16-shot ImageNet at 256 px takes 3.1 GB


def cache_size_for(crop_size: int) -> int:
    """Side of the cached squares for `crop_size` crops: ceil(crop * 8 / 7), 256 for 224."""
    return math.ceil(crop_size * 8 / 7)


def decoded_cache_dir() -> Path:
    """Where decoded squares are stored: `decoded/` in the cache root."""
    return default_cache_dir() / "decoded"


def to_cached_square(image: PILImage.Image, size: int) -> np.ndarray:
    """An RGB image's central square resampled to `size` x `size` (PIL bicubic), as uint8 [3, size, size]."""
    width, height = image.size
    side = min(width, height)
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    square = image.resize((size, size), PILImage.BICUBIC, box=box)
    return np.ascontiguousarray(np.asarray(square, dtype=np.uint8).transpose(2, 0, 1))


def decoder_settings() -> str:
    """What decides whether an image decodes: the decoder's version, the bomb guard's limits, Pillow's version and
    settings (`ImageFile.LOAD_TRUNCATED_IMAGES`) and the formats it can open (plugins such as pillow-heif register
    more). The store is keyed by it, so an image once found unreadable is tried again when any of these change."""
    PILImage.init()
    plugins = hashlib.sha256(",".join(sorted(PILImage.OPEN)).encode()).hexdigest()[:8]
    truncated = int(bool(PILImageFile.LOAD_TRUNCATED_IMAGES))
    return (
        f"d{DECODER_VERSION}-p{PILImage.MAX_IMAGE_PIXELS}-u{UPSCALED_SHORT_SIDE}-pil{PIL.__version__}-t{truncated}"
        f"-f{plugins}"
    )


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
    with open_image_file(value["path"]) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _decode_square(source, size: int) -> tuple[torch.Tensor | None, str | None, str | None]:
    """(uint8 [3, size, size], None, key), or (None, "Error: message", key) for an unreadable image. A file is read
    once and decoded from the bytes that were hashed: `key` is the sha256 of what was decoded (None for a PIL
    image), so a file replaced since it was first hashed is stored under its new content, never the old key."""
    key = None
    try:
        if isinstance(source, dict) and not source.get("bytes"):
            with open_image_file(source["path"]) as f:
                source = {"bytes": f.read(), "path": source["path"]}
        if isinstance(source, dict):
            key = hashlib.sha256(source["bytes"]).hexdigest()
        return torch.from_numpy(to_cached_square(decode_image_value(source), size)), None, key
    except (*UNREADABLE_IMAGE_ERRORS, KeyError) as err:
        return None, f"{type(err).__name__}: {err}", key


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

        With `cache_dir`, each square is stored as `<cache_dir>/v2-<settings>-s<size>/<sha[:2]>/<sha256>.u8` (raw
        uint8 [3, size, size] then its sha256, checked on reading; written atomically) and read back instead of
        decoded; an unreadable image leaves a `.bad` note, keyed by `decoder_settings()`, so later builds with the
        same decoder skip it (not for the decompression-bomb limit, which is a setting). `num_workers` > 0 decodes
        the missing images in DataLoader worker processes.
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
        store = (
            _Store(Path(cache_dir) / f"{CACHE_FORMAT}-{decoder_settings()}-s{size}") if cache_dir is not None else None
        )
        build = _Build(len(dataset), size, store)
        build.plan(undecoded(dataset, image_column)[image_column])
        build.decode_missing(num_workers)
        rows, skipped = build.finish()
        pixels = build.pixels if len(rows) == len(dataset) else build.pixels[rows]  # a copy without unreadable rows
        return cls(torch.from_numpy(pixels), rows, size, skipped, decoded=len(build.sources), reused=build.reused)


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
        """Fill `out` from the stored square; False (decode again) when there is none, or it is truncated or fails
        its checksum (a zeroed or damaged entry is never trained on)."""
        path = self._path(key, ".u8")
        try:
            with open(path, "rb") as f:
                read = f.readinto(memoryview(out).cast("B"))
                checksum = f.read(CHECKSUM_BYTES + 1)
        except OSError:
            return False
        if read == out.size and checksum == hashlib.sha256(memoryview(out).cast("B")).digest():
            return True
        logger.warning("Decoded-image cache entry %s is damaged (checksum); decoding the image again.", path)
        return False

    def write(self, key: str, suffix: str, data: bytes) -> None:
        if not self.writable:
            return
        path = self._path(key, suffix)
        temporary = path.with_name(f"{TEMPORARY_PREFIX}{path.name}.{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_bytes(data)
            os.replace(temporary, path)
        except OSError as err:
            self.writable = False
            logger.warning("Cannot write the decoded-image cache %s (%s); going on without storing.", self.root, err)


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
        indices = dataset[INDEX_COLUMN] if INDEX_COLUMN in dataset.column_names else None
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


class _Build:
    """One `DecodedImageCache.build`: which rows share content (decoded once), which the store already holds, the
    decoding of the rest, and the unreadable rows, each named once."""

    def __init__(self, count: int, size: int, store: _Store | None) -> None:
        self.size, self.store = size, store
        self.names: list[str] = []  # how each row is named if it is unreadable
        # Filled through NumPy: single-threaded copies (an OpenMP team's barrier spins cost more than these).
        self.pixels = np.empty((count, 3, size, size), dtype=np.uint8)
        self.ok = np.zeros(count, dtype=bool)
        self.failures: dict[int, str] = {}  # row -> why it is unreadable
        self.jobs: dict[str, list[int]] = {}  # content key -> the rows with that content (decoded once)
        self.sources: dict[str, object] = {}  # content key -> the value to decode, for the keys not in the store
        self.reused = 0

    def plan(self, values: Iterable) -> None:
        """Key every row by its content; read what the store holds, and note what must be decoded."""
        for position, value in enumerate(values):
            self.names.append(image_name(value))
            try:
                key = _content_key(value)
            except (OSError, KeyError, TypeError) as err:
                self.failures[position] = f"{type(err).__name__}: {err}"
                continue
            if key in self.jobs:
                self.jobs[key].append(position)
                continue
            if self.store is not None and (reason := self.store.bad_reason(key)) is not None:
                self.failures[position] = reason
                continue
            self.jobs[key] = [position]
            if self.store is not None and self.store.read(key, self.pixels[position]):
                self.ok[position] = True
                self.reused += 1
            else:
                self.sources[key] = value

    def decode_missing(self, num_workers: int) -> None:
        """Decode what the store did not hold (in worker processes with `num_workers`), storing each square."""
        keys = list(self.sources)
        loader = DataLoader(
            _DecodeJobs([self.sources[k] for k in keys], self.size),
            batch_size=8,
            collate_fn=_as_list,
            **loader_kwargs(min(num_workers, len(keys)), persistent_workers=False, pin_memory=False),
        )
        for results in loader:
            for i, square, reason, decoded_key in results:
                self._keep(keys[i], decoded_key or keys[i], square, reason)

    def _keep(self, key: str, stored_key: str, square: torch.Tensor | None, reason: str | None) -> None:
        first = self.jobs[key][0]
        if stored_key != key:
            logger.warning("%s changed while the cache was built; stored under its new content.", self.names[first])
        if square is None:
            self.failures.update((position, reason) for position in self.jobs[key])
            if self.store is not None and not reason.startswith("DecompressionBombError"):  # a setting
                self.store.write(stored_key, ".bad", reason.encode())
            return
        if self.store is not None:
            data = square.numpy().tobytes()
            self.store.write(stored_key, ".u8", data + hashlib.sha256(data).digest())
        self.pixels[first] = square.numpy()
        self.ok[first] = True

    def finish(self) -> tuple[list[int], list[str]]:
        """Copy each decoded square to the rows sharing its content; the readable rows, and the unreadable names."""
        for positions in self.jobs.values():
            if self.ok[positions[0]]:
                for position in positions[1:]:
                    self.pixels[position] = self.pixels[positions[0]]
                    self.ok[position] = True
        skipped: list[str] = []
        for position in sorted(self.failures):  # in row order, each named once
            if self.names[position] not in skipped:
                skipped.append(self.names[position])
                logger.warning("Skipping unreadable image %s (%s)", self.names[position], self.failures[position])
        return np.flatnonzero(self.ok).tolist(), skipped
