"""`python examples/visualize.py --adapter ADAPTER IMAGES_OR_DIRS ...`: the same as `dpt-peft visualize`."""

import sys

from dpt_peft.cli import main

if __name__ == "__main__":  # as `dpt-peft visualize`: a refusal is one line (--verbose: the traceback)
    main(["visualize", *sys.argv[1:]])
