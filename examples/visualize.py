"""`python examples/visualize.py --adapter ADAPTER IMAGES_OR_DIRS ...`: the same as `dpt-peft visualize`."""

from dpt_peft.cli import visualize_main

if __name__ == "__main__":
    visualize_main()
