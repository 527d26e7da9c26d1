"""Imported first by every example: Python puts this folder first on sys.path, where `evaluate.py` would
shadow the `evaluate` library that dpt_peft uses. Removing the folder keeps the example's file name."""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
