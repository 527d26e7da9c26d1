"""Zero-shot vs CoOp, VPT, VPT+CoOp and DPT on the embedded default over 3 seeds: the same as `dpt-peft ablation`.

    python examples/ablation.py            # writes docs/results.md, docs/results.json, docs/ablation.png

Extra arguments go to every training run (e.g. `--epochs 10`).
"""

import sys

from dpt_peft.cli import main

if __name__ == "__main__":  # as `dpt-peft ablation`: a refusal is one line (--verbose: the traceback)
    main(["ablation", *sys.argv[1:]])
