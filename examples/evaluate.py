"""Evaluate a DPT adapter: `python examples/evaluate.py --adapter outputs/dpt-toy/adapter [--base_to_new]`.

The same as `dpt-peft evaluate`: writes eval_metrics.json (top-1, mean per-class, base/new/harmonic-mean accuracy)
and a per-class PNG.
"""

import _no_shadow  # noqa: F401, I001  (must come first, see its docstring)

from dpt_peft.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
