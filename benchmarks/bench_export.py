"""Serving latency of an exported adapter: onnxruntime vs PyTorch eager vs the adapter's own forward, and file sizes.

For each shape, a DPT adapter (learned context, deep visual prompts, CAVPT; 10 classes) is saved and exported with
`export_adapter` (the code behind `dpt-peft export`) in each `--dtypes`, and the ways of computing its logits are
timed on random pixels at batch 1 and 32, on this machine's CPU:

- onnxruntime fp32 / fp16: `model.onnx` in an `InferenceSession` (CPU provider), what examples/serve_onnx.py runs;
- eager fp32: the `ServingClassifier` the file was exported from (class features as buffers), under `torch.no_grad`;
- adapter fp32: `model(pixel_values=...)`, the adapter's own forward, with its class-feature cache warm (the text
  tower does not run after the first call).

Each timing is per image: the median over `--repeats` rounds in which every run is called once in turn, after one
warm-up call each, as CPU time (what the run costs, whatever else the machine does) and wall time; torch and
onnxruntime get the same `--threads` (default 1: on a shared 2-core machine, more threads measure the other jobs).
Shapes: `toy` (the shipped toy CLIP, 32 px) and `vit-b16` (ViT-B/16's shape, 224 px, random weights:
`model_shapes.py`).

    python benchmarks/bench_export.py --json bench_export.json
    python benchmarks/bench_export.py --shapes toy --repeats 3      # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime
import torch
from model_shapes import CLIP_SHAPES  # noqa: E402  (sibling module; benchmarks run as scripts)
from peft import get_peft_model
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

import dpt_peft  # noqa: F401  (registers DPT with PEFT)
from dpt_peft import DPTConfig
from dpt_peft.integrations.export import export_adapter
from dpt_peft.integrations.serving import ServingClassifier
from dpt_peft.sources import TOY_CLIP_ID, load_adapted_model, load_base_model
from dpt_peft.toy.tokenizer import build_clip_tokenizer

CLASSES = ["circle", "square", "triangle", "cross", "diamond", "ring", "red", "green", "blue", "yellow"]
BATCHES = (1, 32)


def saved_base(shape: str, folder: Path) -> str:
    """The base model's id or folder: the shipped toy CLIP, or a random CLIP of a real shape saved with a tokenizer
    and a 224 px CLIP image processor."""
    if shape == "toy":
        return TOY_CLIP_ID
    tokenizer = build_clip_tokenizer(CLASSES)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    config = CLIP_SHAPES[shape]
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(**{**config, "text_config": {**config["text_config"], **special}}))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    size = config["vision_config"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
    return str(folder)


def timed(runs: dict[str, Callable], pixel_values: torch.Tensor, repeats: int) -> dict[str, dict[str, float]]:
    """Per image, the median CPU and wall milliseconds of each run over `repeats` rounds that call every run once in
    turn (interleaved, so a change of load on a shared machine hits all of them alike), after one warm-up call each.
    CPU time (`time.process_time`, one thread) is what a run costs whatever else the machine does."""
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run(pixel_values)  # warm-up (and, for the adapter, its class-feature cache)
    for _ in range(repeats):
        for name, run in runs.items():
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            run(pixel_values)
            cpu[name].append(time.process_time() - cpu_start)
            wall[name].append(time.perf_counter() - wall_start)
    per_image = 1000 / len(pixel_values)
    return {
        name: {"cpu_ms": per_image * statistics.median(cpu[name]), "wall_ms": per_image * statistics.median(wall[name])}
        for name in runs
    }


def onnx_session(path: Path) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = torch.get_num_threads()
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(shape: str, dtypes: list[str], repeats: int, work: Path) -> dict:
    base = saved_base(shape, work / "base")
    torch.manual_seed(0)
    context = {"num_text_tokens": 4} if shape == "toy" else {}  # the toy CLIP's text context is 16 tokens (train's)
    config = DPTConfig(class_names=CLASSES, **context)
    get_peft_model(load_base_model(base), config).save_pretrained(work / "adapter")
    model, processor = load_adapted_model(work / "adapter", device="cpu")
    size = processor.crop_size["height"]
    eager = ServingClassifier(model).eval()
    result = {"shape": shape, "files": {}, "latency": {}}
    runs = {}
    for dtype in dtypes:
        start = time.perf_counter()
        onnx = export_adapter(work / "adapter", work / f"onnx_{dtype}", dtype=dtype)
        seconds = time.perf_counter() - start
        program = export_adapter(work / "adapter", work / f"torch_{dtype}", format="torch", dtype=dtype).model_file
        result["files"][dtype] = {
            "onnx_mb": onnx.model_file.stat().st_size / 2**20,
            "pt2_mb": program.stat().st_size / 2**20,
            "onnx_export_seconds": seconds,
            "max_difference": onnx.max_difference,
        }
        session = onnx_session(onnx.model_file)
        runs[f"onnxruntime {dtype}"] = lambda x, session=session: session.run(None, {"pixel_values": x.numpy()})
    runs["eager fp32"] = eager
    runs["adapter fp32"] = lambda x: model(pixel_values=x)
    for batch in BATCHES:
        pixel_values = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            result["latency"][batch] = timed(runs, pixel_values, repeats)
    print(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["toy", "vit-b16"], help="toy, or a CLIP shape of model_shapes")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "fp16"], help="Exported precisions (fp32, fp16).")
    parser.add_argument("--repeats", type=int, default=5, help="Timed rounds per measurement (median).")
    parser.add_argument(
        "--threads", type=int, default=1, help="Threads of torch and of onnxruntime alike (1: a shared machine)."
    )
    parser.add_argument("--json", default=None, help="Also write the results here.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for shape in args.shapes:
        with tempfile.TemporaryDirectory() as work:
            results.append(measure(shape, args.dtypes, args.repeats, Path(work)))
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s) each, torch {torch.__version__}, "
    )
    machine += f"onnxruntime {onnxruntime.__version__}, load average {os.getloadavg()[0]:.1f} at the end"
    print(f"\n{machine}\n")
    print("| shape | batch | run | CPU ms/img | wall ms/img |")
    print("|---|---:|---|---:|---:|")
    for result in results:
        for batch, runs in result["latency"].items():
            for name, times in runs.items():
                print(f"| {result['shape']} | {batch} | {name} | {times['cpu_ms']:.2f} | {times['wall_ms']:.2f} |")
    print("\n| shape | dtype | model.onnx MB | model.pt2 MB | ONNX export s | max \\|Δlogit\\| / logit scale |")
    print("|---|---|---:|---:|---:|---:|")
    for result in results:
        for dtype, files in result["files"].items():
            print(
                f"| {result['shape']} | {dtype} | {files['onnx_mb']:.1f} | {files['pt2_mb']:.1f} | "
                f"{files['onnx_export_seconds']:.0f} | {files['max_difference']:.1e} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
