"""Train a DPT adapter: `python examples/train.py` (the embedded toy default) or `accelerate launch examples/train.py ...`.

Run with --help for every option; the logic lives in `dpt_peft.training` so it is tested.
"""

import _no_shadow  # noqa: F401  (must come first, see its docstring)

from dpt_peft.training.cli import train_main

if __name__ == "__main__":
    train_main()
