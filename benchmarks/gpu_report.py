"""Append the GPU rows of `run_gpu.sh` to docs/benchmarks.md: MFU, peak memory, and what bounds each run.

A training configuration is input-bound when the fastest loading path measured by bench_input.py delivers fewer
images/s than the model consumes; otherwise it is model-bound.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--markdown", required=True)
    args = parser.parse_args()
    with open(args.train) as f:
        train = json.load(f)
    with open(args.input) as f:
        loading = json.load(f)
    fastest = max(row["images_per_s"] for row in loading["rows"])
    device = train[0]["device"] if train else "?"
    lines = [
        "",
        f"## GPU: {device} (measured {time.strftime('%Y-%m-%d')})",
        "",
        f"`bash benchmarks/run_gpu.sh`. Fastest input path: {fastest:.0f} training images/s.",
        "",
        "| method | classes | text path | img/s | MFU (bf16 peak) | text share | peak MB | infer img/s | infer cost "
        "(bare image passes) | bound by |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in train:
        if row.get("error"):
            lines.append(
                f"| {row['method']} | {row['num_classes']} | {row['text_encoding']} | failed: "
                f"{row['error'][:60]} | | | | | | |"
            )
            continue
        bound = "input" if fastest < row["images_per_s"] else "model"
        share = row.get("peak_share")
        lines.append(
            f"| {row['method']} | {row['num_classes']} | {row['text_encoding']} | {row['images_per_s']:.0f} | "
            f"{'-' if share is None else f'{100 * share:.0f}%'} | {100 * row['text_share']:.0f}% | "
            f"{row['peak_mem_mb']:.0f} | {row['infer_images_per_s']:.0f} | {row['infer_cost_in_bare_passes']:.2f} | "
            f"{bound} |"
        )
    with open(args.markdown, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
