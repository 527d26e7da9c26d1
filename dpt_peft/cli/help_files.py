"""The help texts that dpt_peft_launcher.py prints for `dpt-peft --help` and `dpt-peft <command> --help` without
importing torch: written from the command table (`cli/__init__.py: COMMANDS`) by `python -m dpt_peft.cli.help_files`,
and checked against the real parsers by tests/cli/test_cli_help.py.

Why a cache at all: any `dpt_peft` import registers DPT with PEFT, which imports torch and transformers (seconds),
and a `--help` should answer at once. Why it cannot go stale unseen: argparse lays help out differently from one
Python to the next, so the test compares the texts exactly on the version that wrote them (`PYTHON_VERSION_FILE`)
and, on any other version, checks that every flag and every help sentence of the real parsers is in them.
"""

from __future__ import annotations

import platform
from pathlib import Path

from . import COMMANDS
from .commands import overview

HELP_DIR = Path(__file__).parent / "help"
OVERVIEW_NAME = "dpt-peft"
PYTHON_VERSION_FILE = HELP_DIR / "python_version"
REGENERATE = "python -m dpt_peft.cli.help_files"


def help_texts() -> dict[str, str]:
    """Each help file's name and the text the real parser prints."""
    texts = {OVERVIEW_NAME: overview(COMMANDS)}
    for command in COMMANDS:
        texts |= command.help_texts()
    return texts


def write_help_texts() -> None:
    HELP_DIR.mkdir(exist_ok=True)
    for stale in HELP_DIR.glob("*.txt"):
        stale.unlink()
    for name, text in help_texts().items():
        (HELP_DIR / f"{name}.txt").write_text(text)
    PYTHON_VERSION_FILE.write_text(".".join(platform.python_version_tuple()[:2]) + "\n")


if __name__ == "__main__":
    write_help_texts()
    print(f"wrote {len(help_texts())} help texts to {HELP_DIR}")
