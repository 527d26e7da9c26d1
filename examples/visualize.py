"""`python examples/visualize.py --adapter ADAPTER IMAGES_OR_DIRS ...` (see --help)."""

import _no_shadow  # noqa: F401  (must come first, see its docstring)

from dpt_peft.inference_cli import visualize_main

if __name__ == "__main__":
    visualize_main()
