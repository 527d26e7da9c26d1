"""The help texts that dpt_peft_launcher.py prints for `dpt-peft --help` and `dpt-peft <command> --help` without
importing torch: written from the real parsers by `python -m dpt_peft.cli.help_files`, and checked against them by
tests/test_cli_help.py."""

from __future__ import annotations

import platform
from pathlib import Path

from .parsers import PARSERS, overview

HELP_DIR = Path(__file__).parent / "help"
OVERVIEW_NAME = "dpt-peft"
# argparse's layout changes between Python versions: the texts are compared on the version that wrote them.
PYTHON_VERSION_FILE = HELP_DIR / "python_version"
REGENERATE = "python -m dpt_peft.cli.help_files"


def help_texts() -> dict[str, str]:
    """Each help file's name and the text the real parser prints."""
    return {OVERVIEW_NAME: overview(), **{name: build().format_help() for name, build in PARSERS.items()}}


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
