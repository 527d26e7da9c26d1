"""`python -m dpt_peft <command>` and `accelerate launch -m dpt_peft <command>`: the same as `dpt-peft`."""

from .cli import main

if __name__ == "__main__":
    main()
