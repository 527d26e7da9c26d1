"""Training and inference throughput of DPT adapters: the reference-style baseline vs our path, in one run.

Baseline (as the reference code): prompts padded to the text encoder's full context, eager attention, fp32,
class features recomputed at every inference call. Ours: prompts cut after the longest end token, SDPA,
bf16 autocast on CUDA, class features cached at inference. Both use the same random model of real shape, a CLIP
or a SigLIP (`model_shapes.py`). SigLIP's bidirectional text tower pools its last position, so on both paths its
prompts stay padded to the 64-token context and its text path is the full one (no shared prefix: "auto" is "full").
Each (method, classes, path) runs in its own process, so peak memory is its own.

    python benchmarks/bench_train.py --json bench.json                 # ViT-B/16 on CUDA, "small" on CPU
    python benchmarks/bench_train.py --shape siglip-b16 --json bench_siglip.json    # SigLIP-B/16 (GPU)
    python benchmarks/bench_train.py --shape tiny --classes 5 --steps 1 --warmup 0   # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from model_shapes import SHAPES, family  # noqa: E402  (sibling module; benchmarks run as scripts)
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 peak of known GPUs (TFLOP/s), for the share of peak we reach.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
# Our path's text encodings per family: SigLIP's bidirectional tower has no shared prefix, so "auto" is "full".
TEXT_ENCODINGS = {"clip": ["auto", "full"], "siglip": ["auto"]}


def _save_tokenizer(shape: str, tokenizer_dir: str) -> None:
    """An offline tokenizer of the family; SigLIP's pads to its text context (`padding="max_length"`, as trained)."""
    if family(shape) == "siglip":
        from dpt_peft.toy.siglip import build_siglip_tokenizer

        tokenizer = build_siglip_tokenizer(["class"])
        tokenizer.model_max_length = SHAPES[shape]["text_config"]["max_position_embeddings"]
    else:
        from dpt_peft.toy.tokenizer import build_clip_tokenizer

        tokenizer = build_clip_tokenizer(["class"])
    tokenizer.save_pretrained(tokenizer_dir)


def _base_model(shape: str, tokenizer) -> torch.nn.Module:
    """A random model of `shape` whose text config uses the tokenizer's special tokens, as a real checkpoint does:
    CLIP pools at the tokenizer's end token; SigLIP pads with its pad token and has no start token."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    if family(shape) == "siglip":
        model_class, config_class = SiglipModel, SiglipConfig
        special = dict(bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    else:
        model_class, config_class = CLIPModel, CLIPConfig
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    text_config = {**SHAPES[shape]["text_config"], **special}
    return model_class(config_class(**{**SHAPES[shape], "text_config": text_config}))


def _build(
    shape: str,
    method: str,
    num_classes: int,
    baseline: bool,
    tokenizer_dir: str,
    device: str,
    text_encoding: str = "auto",
):
    from peft import get_peft_model
    from transformers import AutoTokenizer

    import dpt_peft  # noqa: F401
    from dpt_peft import DPTConfig

    torch.manual_seed(0)
    base = _base_model(shape, AutoTokenizer.from_pretrained(tokenizer_dir))
    for config in (base.config, base.config.text_config, base.config.vision_config):
        config._attn_implementation = "eager" if baseline else "sdpa"
    config = DPTConfig.for_method(
        method,
        class_names=[f"class {i}" for i in range(num_classes)],
        tokenizer_name_or_path=tokenizer_dir,
        pad_text_to_context=baseline,
        cache_class_features=not baseline,
        text_encoding="full" if baseline else text_encoding,
    )
    return get_peft_model(base, config).to(device)


def _resident_peak_mb() -> float:
    """This process's peak resident memory. (getrusage's ru_maxrss survives fork+exec, so a child would report
    its parent's peak; VmHWM belongs to the new address space.)"""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(
    shape: str,
    method: str,
    num_classes: int,
    baseline: bool,
    batch_size: int,
    steps: int,
    warmup: int,
    tokenizer_dir: str,
    device: str,
    text_encoding: str = "auto",
) -> dict:
    """One configuration: training step time, the text side's share of it, inference images/s, FLOPs per step,
    peak memory."""
    model = _build(shape, method, num_classes, baseline, tokenizer_dir, device, text_encoding)
    size = SHAPES[shape]["vision_config"]["image_size"]
    pixels = torch.randn(batch_size, 3, size, size, device=device)
    labels = torch.randint(0, num_classes, (batch_size,), device=device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda" and not baseline)

    def train_step() -> None:
        with autocast:
            loss = model(pixel_values=pixels, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    train_step()  # first step: one-time work (e.g. caching the frozen class features) is not a per-step cost
    with FlopCounterMode(display=False) as counter:
        train_step()
    for _ in range(warmup):
        train_step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step()
    _synchronize(device)
    step_seconds = (time.perf_counter() - start) / steps

    def text_step() -> None:
        """The class side of a training step alone: every class prompt through the text encoder, and back."""
        with autocast:
            features = model.class_text_features()
        if features.requires_grad:
            features.float().square().mean().backward()

    with FlopCounterMode(display=False) as text_counter:
        text_step()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        text_step()
    _synchronize(device)
    text_seconds = (time.perf_counter() - start) / steps
    optimizer.zero_grad(set_to_none=True)

    model.eval()
    with torch.no_grad(), autocast:
        model(pixel_values=pixels)  # warm-up (and, on our path, the class-feature cache)
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            model(pixel_values=pixels)
        _synchronize(device)
    infer_seconds = (time.perf_counter() - start) / steps
    with torch.no_grad(), autocast, model.disable_adapter():
        base = model.get_base_model()
        base.get_image_features(pixel_values=pixels)
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            base.get_image_features(pixel_values=pixels)  # one bare image-encoder pass: the floor of inference
        _synchronize(device)
    bare_seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _resident_peak_mb()
    return {
        "step_ms": 1000 * step_seconds,
        "images_per_s": batch_size / step_seconds,
        "infer_images_per_s": batch_size / infer_seconds,
        "bare_image_pass_images_per_s": batch_size / bare_seconds,
        "infer_cost_in_bare_passes": infer_seconds / bare_seconds,
        "flops_per_step": counter.get_total_flops(),
        "text_ms": 1000 * text_seconds,
        "text_share": text_seconds / step_seconds,
        "text_flops_per_step": text_counter.get_total_flops(),
        "peak_mem_mb": peak,
    }


def logits_difference(
    shape: str, method: str, num_classes: int, tokenizer_dir: str, device: str, text_encoding: str
) -> float:
    """Max |logit| difference between the two paths in fp32 (same weights): our shortcuts must be exact."""
    results = []
    for baseline in (True, False):
        model = _build(shape, method, num_classes, baseline, tokenizer_dir, device, text_encoding).eval()
        size = SHAPES[shape]["vision_config"]["image_size"]
        pixels = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
        with torch.no_grad():
            results.append(model(pixel_values=pixels).logits.float())
    return (results[0] - results[1]).abs().max().item()


def _child(args: argparse.Namespace) -> None:
    result = measure(
        args.shape,
        args.method,
        args.num_classes,
        args.baseline,
        args.batch_size,
        args.steps,
        args.warmup,
        args.tokenizer_dir,
        args.device,
        args.text_encoding,
    )
    if not args.baseline:
        result["max_logit_diff_fp32"] = logits_difference(
            args.shape, args.method, args.num_classes, args.tokenizer_dir, args.device, args.text_encoding
        )
    print("RESULT " + json.dumps(result))


def _run_child(args, method: str, num_classes: int, baseline: bool, tokenizer_dir: str, text_encoding: str) -> dict:
    """One configuration in its own process; `{"error": ...}` when it fails (e.g. the baseline does not fit)."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "--shape",
        args.shape,
        "--device",
        args.device,
        "--method",
        method,
        "--num_classes",
        str(num_classes),
        "--batch_size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--tokenizer_dir",
        tokenizer_dir,
        "--text_encoding",
        text_encoding,
    ]
    if baseline:
        command.append("--baseline")
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        reason = "killed (out of memory?)" if completed.returncode in (-9, 137) else completed.stderr.strip()[-500:]
        print(f"  {'baseline' if baseline else text_encoding} run failed: {reason}", flush=True)
        return {"error": reason}
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shape", choices=list(SHAPES), default=None, help="Model shape (default: vit-b16 on CUDA, small on CPU)."
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", default=["coop", "vpt", "dpt"])
    parser.add_argument("--classes", nargs="+", type=int, default=[10, 100, 1000])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--text_encodings",
        nargs="+",
        choices=["auto", "full", "shared_prefix"],
        help="Our path's text encodings, one row each (default: auto and full for CLIP, auto for SigLIP).",
    )
    parser.add_argument("--json", help="Write the rows here.")
    parser.add_argument("--skip_baseline", action="store_true", help="Only our path (the baseline is slow).")
    parser.add_argument("--text_encoding", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--num_classes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.shape = args.shape or ("vit-b16" if args.device == "cuda" else "small")
    if args.child:
        return _child(args)
    args.text_encodings = args.text_encodings or TEXT_ENCODINGS[family(args.shape)]
    if family(args.shape) == "siglip" and "shared_prefix" in args.text_encodings:
        parser.error(
            f"--text_encodings shared_prefix does not apply to --shape {args.shape}: SigLIP's text attention is "
            "bidirectional, so the prefix's hidden states depend on the class tokens. Use auto (the full path)."
        )

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
    rows = []
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        _save_tokenizer(args.shape, tokenizer_dir)
        for method in args.methods:
            for num_classes in args.classes:
                base = {} if args.skip_baseline else _run_child(args, method, num_classes, True, tokenizer_dir, "full")
                for text_encoding in args.text_encodings:
                    ours = _run_child(args, method, num_classes, False, tokenizer_dir, text_encoding)
                    rows.append(_row(args, method, num_classes, text_encoding, base, ours, device_name, peak))
                    _print_row(rows[-1])
    print(f"device: {device_name}; shape: {args.shape} ({family(args.shape)}); batch {args.batch_size}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def _row(args, method, num_classes, text_encoding, base: dict, ours: dict, device_name: str, peak) -> dict:
    """One table row: our path with one text encoding next to the baseline (None where a run failed)."""
    achieved = _ratio(ours.get("flops_per_step"), (ours.get("step_ms") or 0) / 1000)
    achieved = achieved / 1e12 if achieved else None
    row = {
        "method": method,
        "num_classes": num_classes,
        "text_encoding": text_encoding,
        "shape": args.shape,
        "family": family(args.shape),
        "device": device_name,
        "batch_size": args.batch_size,
        "baseline_error": base.get("error"),
        "error": ours.get("error"),
        "achieved_tflops": achieved,
        "peak_share": achieved / peak if achieved and peak else None,
        "speedup": _ratio(ours.get("images_per_s"), base.get("images_per_s")),
        "infer_speedup": _ratio(ours.get("infer_images_per_s"), base.get("infer_images_per_s")),
    }
    for key in ("images_per_s", "step_ms", "infer_images_per_s", "peak_mem_mb", "flops_per_step"):
        row[f"baseline_{key}"] = base.get(key)
        row[key] = ours.get(key)
    for key in (
        "text_ms",
        "text_share",
        "text_flops_per_step",
        "bare_image_pass_images_per_s",
        "infer_cost_in_bare_passes",
        "max_logit_diff_fp32",
    ):
        row[key] = ours.get(key)
    return row


def _print_row(row: dict) -> None:
    def show(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print(
        f"{row['method']:5} {row['num_classes']:5} classes, text {row['text_encoding']:5}: train "
        f"{show(row['baseline_images_per_s'], '8.2f')} -> {show(row['images_per_s'], '8.2f')} img/s "
        f"({show(row['speedup'], '.2f')}x), text share {show(row['text_share'], '.0%')}, "
        f"GFLOP/step {show(row['flops_per_step'] and row['flops_per_step'] / 1e9, '.0f')}, infer "
        f"{show(row['baseline_infer_images_per_s'], '8.1f')} -> {show(row['infer_images_per_s'], '8.1f')} img/s "
        f"({show(row['infer_cost_in_bare_passes'], '.2f')} bare passes), "
        f"peak {show(row['baseline_peak_mem_mb'], '.0f')} -> {show(row['peak_mem_mb'], '.0f')} MB, "
        f"|dlogit| {show(row['max_logit_diff_fp32'], '.1e')}",
        flush=True,
    )


if __name__ == "__main__":
    main()
