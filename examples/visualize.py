"""`python examples/visualize.py --adapter ADAPTER IMAGES_OR_DIRS ...`: the same as `dpt-peft visualize`."""

import _no_shadow  # noqa: F401, I001  (must come first, see its docstring)

from dpt_peft.cli import visualize_main

if __name__ == "__main__":
    visualize_main()
