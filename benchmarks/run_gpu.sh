#!/usr/bin/env bash
# The GPU benchmark set: ViT-B/16 training and inference at 10, 100 and 1000 classes (both text paths, the
# reference-style baseline where it fits), the input pipeline's paths, then the rows into docs/benchmarks.md.
#     bash benchmarks/run_gpu.sh            # on a CUDA machine, from the repository root
set -euo pipefail
cd "$(dirname "$0")"
out="${OUT:-$(mktemp -d)}"
python bench_input.py --workers 8 --json "$out/input.json"
python bench_train.py --shape vit-b16 --methods coop vpt dpt --classes 10 100 1000 --steps 10 --warmup 3 \
    --json "$out/train.json"
python gpu_report.py --train "$out/train.json" --input "$out/input.json" --markdown ../docs/benchmarks.md
