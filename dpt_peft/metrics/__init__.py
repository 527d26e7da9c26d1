"""Metric modules shipped with dpt_peft, loadable offline with `evaluate.load(path)`."""

from pathlib import Path

ACCURACY_PATH = str(Path(__file__).with_name("accuracy.py"))
