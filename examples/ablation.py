"""Zero-shot vs CoOp, VPT, VPT+CoOp and DPT on the embedded default over 3 seeds.

    python examples/ablation.py            # writes docs/results.md, docs/results.json, docs/ablation.png

Extra arguments go to every training run (e.g. `--epochs 10`).
"""

import _no_shadow  # noqa: F401  (must come first, see its docstring)

import argparse
import os

from dpt_peft.training.ablation import run_ablation, write_report

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/ablation")
    parser.add_argument("--docs_dir", default="docs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args, extra = parser.parse_known_args()
    results = run_ablation(args.output_dir, tuple(args.seeds), extra)
    write_report(results, os.path.join(args.docs_dir, "results.md"), os.path.join(args.docs_dir, "ablation.png"),
                 "python examples/ablation.py")
    print(open(os.path.join(args.docs_dir, "results.md")).read())
