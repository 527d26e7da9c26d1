"""Entry points of the example scripts."""

from __future__ import annotations

import logging
from typing import Optional

from .arguments import parse_args
from .trainer import train


def train_main(argv: Optional[list[str]] = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, overrides = parse_args(argv)
    return train(args, overrides)
