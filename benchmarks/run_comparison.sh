#!/usr/bin/env bash
# The real comparison of issues 27 and 28, one command on a CUDA machine with the CoOp datasets:
#   1. base-to-new: zero-shot CLIP, CoOp, the linear probe (base only: n/a on new classes), DPT, and DPT with the
#      generalization options (self-consistency; + Gaussian prompt averaging; a zero-shot ensemble of 0.5);
#   2. few-shot: the linear probe, CoOp, DPT and LoRA.
# on every CoOp dataset found under DATA_ROOT, each protocol one table in OUTPUT_DIR/<protocol>/results.md.
#     bash benchmarks/run_comparison.sh DATA_ROOT [OUTPUT_DIR] [grid flags, e.g. --executor local]
# SEEDS (default "1 2 3") and SHOTS (few-shot, default "1 2 4 8 16") change the grid; a killed run continues.
set -euo pipefail
data_root="${1:?usage: bash benchmarks/run_comparison.sh DATA_ROOT [OUTPUT_DIR] [grid flags]}"
out="${2:-outputs/comparison}"
shift $(( $# > 1 ? 2 : 1 ))
read -r -a seeds <<< "${SEEDS:-1 2 3}"
read -r -a shots <<< "${SHOTS:-1 2 4 8 16}"
# The CoOp datasets whose folder is under DATA_ROOT (the benchmark then checks each in full before its first run).
mapfile -t datasets < <(python - "$data_root" <<'PY'
import sys
from pathlib import Path

from dpt_peft.data.catalog import COOP_DATASETS, FEW_SHOT_DATASETS

root = Path(sys.argv[1])
print("\n".join(name for name in FEW_SHOT_DATASETS if (root / COOP_DATASETS[name].directory).is_dir()))
PY
)
if [ "${#datasets[@]}" -eq 0 ] || [ -z "${datasets[0]}" ]; then
    echo "run_comparison.sh: no CoOp dataset under $data_root (its folders are named as in CoOp's DATASETS.md," \
        "e.g. caltech-101/, oxford_pets/, dtd/); download one there first." >&2
    exit 2
fi
echo "datasets found: ${datasets[*]}"
src="--consistency_weights 10 25 1"
python -m dpt_peft benchmark --protocol base_to_new --data_root "$data_root" --output_dir "$out" \
    --datasets "${datasets[@]}" --seeds "${seeds[@]}" --methods linear_probe coop dpt \
    --variant "dpt_consistency=--method dpt $src" \
    --variant "dpt_consistency_gpa=--method dpt $src --prompt_averaging gaussian" \
    --variant "dpt_ensemble=--method dpt --zero_shot_ensemble 0.5" \
    "$@"
python -m dpt_peft benchmark --protocol few_shot --data_root "$data_root" --output_dir "$out" \
    --datasets "${datasets[@]}" --seeds "${seeds[@]}" --shots "${shots[@]}" --methods linear_probe coop dpt lora \
    "$@"
