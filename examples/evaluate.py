"""Evaluate a DPT adapter: `python examples/evaluate.py --adapter outputs/dpt-toy/adapter [--base_to_new]`.

Writes eval_metrics.json (top-1, mean per-class, base/new/harmonic-mean accuracy) and a per-class PNG.
"""

import _no_shadow  # noqa: F401  (must come first, see its docstring)

from dpt_peft.training.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
