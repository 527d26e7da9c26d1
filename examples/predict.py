"""`python examples/predict.py --adapter ADAPTER IMAGES_OR_DIRS ...`: the same as `dpt-peft predict` (see --help)."""

import sys

from dpt_peft.cli import main

if __name__ == "__main__":  # as `dpt-peft predict`: a refusal is one line (--verbose: the traceback)
    main(["predict", *sys.argv[1:]])
