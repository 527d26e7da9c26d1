"""Input pipeline: training images/s and host CPU per training image, today's path against the decode-once cache.

Rows (one run, same JPEGs, 224-pixel training batches):

- pil_main_process: `ImageBatcher(train=True)` as the collate of a DataLoader with num_workers=0 (today's path:
  PIL decode, random resized crop, flip and the CLIP image processor in the main process, every epoch);
- pil_workers: the same decoding in `--workers` DataLoader worker processes: `ReportingImageBatcher` (ImageBatcher
  whose epoch is shared with persistent workers and whose batches carry their skipped images, counted by
  `SkipCounter` in the main process) with `loader_kwargs(n)` (persistent workers, prefetch 4);
- decoded_cache: `DecodedImageCache` built once (its build, cold and then from the on-disk store, is reported
  apart), batches of cached uint8 squares (`CachedImageDataset` + `collate_cached`), then `DeviceAugmenter` on
  `--device` (on a CPU-only machine the "device" is the host, so its CPU time is reported with and without it).

Host CPU per image = (this process's CPU time, `time.process_time()`, all its threads) + (CPU time of its child
processes, the DataLoader workers: psutil's `cpu_times()` of the live ones plus `getrusage(RUSAGE_CHILDREN)` for
those that ended), both taken as differences over the timed epochs, divided by the images delivered.

    python benchmarks/bench_input.py --json bench_input.json
    python benchmarks/bench_input.py --images 64 --epochs 1 --json /tmp/quick.json    # seconds, a smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil  # an Accelerate dependency
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image
from torch.utils.data import DataLoader

from dpt_peft.data.augmentation import DeviceAugmenter
from dpt_peft.data.batching import ImageBatcher, ReportingImageBatcher, SkipCounter, undecoded, with_index
from dpt_peft.data.decoded_cache import (
    CachedImageDataset,
    DecodedImageCache,
    cache_size_for,
    collate_cached,
    to_cached_square,
)
from dpt_peft.data.loaders import loader_kwargs

PHOTO = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"


def write_jpegs(folder: Path, count: int, width: int, height: int, quality: int, seed: int = 0) -> list[str]:
    """Photo-like JPEGs: random regions of a real photo (matplotlib's grace_hopper.jpg), flipped at random, with
    per-channel gain and mild sensor-like noise, so that each file is different and compresses like a photo."""
    rng = np.random.default_rng(seed)
    photo = Image.open(PHOTO).convert("RGB")
    paths = []
    for i in range(count):
        scale = rng.uniform(0.55, 1.0)
        w = int(photo.width * scale)
        h = min(photo.height, int(w * height / width))
        left, top = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
        view = photo.crop((left, top, left + w, top + h)).resize((width, height), Image.BICUBIC)
        pixels = np.asarray(view, dtype=np.float32) * rng.uniform(0.8, 1.2, size=3) + rng.normal(
            0, 3, (height, width, 3)
        )
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        path = folder / f"{i:05d}.jpg"
        image.save(path, quality=quality)
        paths.append(str(path))
    return paths


def children_cpu_s() -> float:
    """CPU time of this process's children: the live ones (psutil) and those that ended (getrusage)."""
    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = ended.ru_utime + ended.ru_stime
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.Error:  # ended in between: its time is in the next getrusage
            pass
    return total


class CpuClock:
    """Wall time, this process's CPU time and its children's CPU time since it was made."""

    def __init__(self):
        self.wall = time.perf_counter()
        self.main = time.process_time()
        self.children = children_cpu_s()

    def since(self) -> dict:
        return {
            "wall_s": time.perf_counter() - self.wall,
            "main_cpu_s": time.process_time() - self.main,
            "children_cpu_s": children_cpu_s() - self.children,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def pil_row(dataset, processor, args, workers: int) -> dict:
    if workers == 0:  # today's path
        batcher = ImageBatcher(processor, "image", "label", train=True, seed=0)
    else:
        batcher = ReportingImageBatcher(processor, "image", "label", train=True, seed=0)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        collate_fn=batcher,
        drop_last=True,
        **loader_kwargs(workers),
    )
    counter = SkipCounter()

    def epoch(number: int) -> int:
        batcher.epoch = number
        batches = (counter.take(batch) if workers else batch for batch in loader)
        return sum(len(batch["labels"]) for batch in batches if batch is not None)

    epoch(0)  # warm-up: file cache, lazy imports, first worker start
    clock = CpuClock()
    images = sum(epoch(1 + e) for e in range(args.epochs))
    measured = clock.since()
    return {
        "path": "pil_main_process" if workers == 0 else "pil_workers",
        "num_workers": workers,
        "images": images,
        **measured,
        "images_per_s": images / measured["wall_s"],
        "cpu_ms_per_image": 1000 * (measured["main_cpu_s"] + measured["children_cpu_s"]) / images,
    }


def cache_rows(dataset, processor, args, device: torch.device, cache_dir: Path) -> tuple[dict, dict]:
    crop = 224
    size = cache_size_for(crop)
    builds = {}
    for name in ("cold", "warm"):  # empty store, then the store written by the cold build
        clock = CpuClock()
        cache = DecodedImageCache.build(dataset, "image", size, cache_dir=cache_dir, num_workers=args.workers)
        measured = clock.since()
        builds[name] = {
            "num_workers": args.workers,
            "decoded": cache.decoded,
            "reused": cache.reused,
            **measured,
            "cpu_ms_per_image": 1000 * (measured["main_cpu_s"] + measured["children_cpu_s"]) / len(dataset),
        }
    samples = CachedImageDataset.from_dataset(cache, dataset, "label")
    loader = DataLoader(
        samples,
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        collate_fn=collate_cached,
        drop_last=True,
        pin_memory=device.type == "cuda",
    )
    augmenter = DeviceAugmenter.from_processor(processor, seed=0)

    def epoch(number: int, pixel_work: bool) -> int:
        """One epoch of batches; without `pixel_work` only what the host does in a GPU run: load the batch, copy it
        and draw the boxes (the crops, resizes and normalization run on the GPU there)."""
        count = 0
        for batch in loader:
            images = batch["images"].to(device, non_blocking=True)
            if pixel_work:
                pixels = augmenter(images, number, batch["indices"])
            else:
                pixels = augmenter.draws(images.shape[3], images.shape[2], number, batch["indices"])
            count += len(pixels)
        _sync(device)
        return count

    measured = {}
    for pixel_work in (True, False):
        epoch(0, pixel_work)  # warm-up
        clock = CpuClock()
        images = sum(epoch(1 + e, pixel_work) for e in range(args.epochs))
        measured[pixel_work] = {**clock.since(), "images": images}
    full, host = measured[True], measured[False]
    row = {
        "path": "decoded_cache",
        "num_workers": 0,
        **full,
        "images_per_s": full["images"] / full["wall_s"],
        "cpu_ms_per_image": 1000 * (full["main_cpu_s"] + full["children_cpu_s"]) / full["images"],
        "augment_device": str(device),
        "host_only": host,
        "host_only_images_per_s": host["images"] / host["wall_s"],
        "cpu_ms_per_image_excluding_augmentation": 1000
        * (host["main_cpu_s"] + host["children_cpu_s"])
        / host["images"],
        "cache_size": size,
        "cache_mb": cache.pixels.numel() / 1e6,
    }
    return row, builds


def no_augmentation_fidelity(paths: list[str], processor, count: int) -> dict:
    """The no-augmentation view of the cached squares against the processor on the original JPEGs, in 8-bit levels."""
    originals = [Image.open(p).convert("RGB") for p in paths[:count]]
    expected = processor(images=originals, return_tensors="pt")["pixel_values"]
    squares = torch.stack([torch.from_numpy(to_cached_square(image, cache_size_for(224))) for image in originals])
    got = DeviceAugmenter.from_processor(processor, train=False)(squares)
    levels = (got - expected).abs() * torch.tensor(processor.image_std).view(1, 3, 1, 1) * 255
    return {
        "images": count,
        "mean_levels": levels.mean().item(),
        "p99_levels": levels.flatten().quantile(0.99).item(),
        "max_levels": levels.max().item(),
        "max_normalized": (got - expected).abs().max().item(),
    }


def machine() -> dict:
    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "unknown"
    )
    return {
        "cpu": model,
        "cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": Image.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per row, after one warm-up epoch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--torch_threads", type=int, help="intra-op threads of this process (default: torch's)")
    parser.add_argument("--json", help="write the rows and the machine here")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    device = torch.device(args.device)
    started = machine()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        paths = write_jpegs(folder, args.images, args.width, args.height, args.quality)
        jpeg_kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
        dataset = Dataset.from_dict({"image": paths, "label": [i % 10 for i in range(len(paths))]})
        dataset = with_index(undecoded(dataset.cast_column("image", ImageFeature()), "image"))
        rows = [pil_row(dataset, processor, args, 0), pil_row(dataset, processor, args, args.workers)]
        cached, builds = cache_rows(dataset, processor, args, device, Path(tmp) / "cache")
        rows.append(cached)
        fidelity = no_augmentation_fidelity(paths, processor, min(32, len(paths)))

    main_process, workers = rows[0], rows[1]
    cpu_ratio_excluding = main_process["cpu_ms_per_image"] / cached["cpu_ms_per_image_excluding_augmentation"]
    cpu_ratio_including = main_process["cpu_ms_per_image"] / cached["cpu_ms_per_image"]
    worker_speedup = workers["images_per_s"] / main_process["images_per_s"]
    targets = {
        "cpu_ratio_excluding_augmentation": cpu_ratio_excluding,
        "cpu_ratio_including_augmentation": cpu_ratio_including,
        "cache_20x_less_cpu_met (excluding augmentation: a GPU run)": cpu_ratio_excluding >= 20,
        "cache_20x_less_cpu_met_including_augmentation (a CPU-only run)": cpu_ratio_including >= 20,
        "worker_speedup": worker_speedup,
        "workers_1.6x_met": worker_speedup >= 1.6,
    }

    print(
        f"{args.images} JPEGs {args.width}x{args.height} q{args.quality} ({jpeg_kb:.0f} KB each), batch "
        f"{args.batch_size}, 224-pixel crops, {args.epochs} timed epochs; {started['cpus']} CPUs, load "
        f"{started['load_average'][0]:.1f}"
    )
    print("| path | num_workers | images/s | host CPU ms/image | CPU ms/image excl. augmentation |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        excluding = row.get("cpu_ms_per_image_excluding_augmentation")
        print(
            f"| {row['path']} | {row['num_workers']} | {row['images_per_s']:.1f} | {row['cpu_ms_per_image']:.2f} | "
            f"{'' if excluding is None else f'{excluding:.3f}'} |"
        )
    for name, build in builds.items():
        print(
            f"cache build ({name}): {build['wall_s']:.2f} s wall, {build['cpu_ms_per_image']:.2f} CPU ms/image, "
            f"decoded {build['decoded']}, read back {build['reused']}"
        )
    print(
        f"no-augmentation view vs processor on the original JPEGs: mean {fidelity['mean_levels']:.2f}, p99 "
        f"{fidelity['p99_levels']:.1f}, max {fidelity['max_levels']:.1f} levels of 255"
    )
    for name, value in targets.items():
        print(f"{name}: {value:.2f}" if isinstance(value, float) else f"{name}: {value}")
    if args.json:
        result = {
            "command": " ".join(["python", "benchmarks/bench_input.py", *sys.argv[1:]]),
            "machine": started,
            "load_average_after": os.getloadavg(),
            "jpeg_kb": jpeg_kb,
            "settings": vars(args),
            "rows": rows,
            "cache_builds": builds,
            "no_augmentation_fidelity": fidelity,
            "targets": targets,
        }
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
