"""`python examples/predict.py --adapter ADAPTER IMAGES_OR_DIRS ...`: the same as `dpt-peft predict` (see --help)."""

from dpt_peft.cli import predict_main

if __name__ == "__main__":
    predict_main()
