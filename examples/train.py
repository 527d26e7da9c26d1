"""Train a DPT adapter: `python examples/train.py` (the embedded toy default) or `accelerate launch examples/train.py`.

The same as `dpt-peft train`; run with --help for every option.
"""

import sys

from dpt_peft.cli import main

if __name__ == "__main__":  # as `dpt-peft train`: a refusal is one line (--verbose: the traceback)
    main(["train", *sys.argv[1:]])
