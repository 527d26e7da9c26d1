"""Train a DPT adapter: `python examples/train.py` (the embedded toy default) or `accelerate launch examples/train.py`.

The same as `dpt-peft train`; run with --help for every option.
"""

from dpt_peft.cli import train_main

if __name__ == "__main__":
    train_main()
