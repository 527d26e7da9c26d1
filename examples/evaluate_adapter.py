"""Evaluate a DPT adapter: `python examples/evaluate_adapter.py --adapter outputs/dpt-toy/adapter [--base_to_new]`.

The same as `dpt-peft evaluate`: writes eval_metrics.json (top-1, mean per-class, base/new/harmonic-mean accuracy)
and a per-class PNG.
"""

import sys

from dpt_peft.cli import main

if __name__ == "__main__":  # as `dpt-peft evaluate`: a refusal is one line (--verbose: the traceback)
    main(["evaluate", *sys.argv[1:]])
