"""Training and evaluation of DPT adapters (the logic behind `examples/train.py` and `examples/evaluate_adapter.py`)."""
