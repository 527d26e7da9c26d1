"""The command table's row type, the `dpt-peft --help` overview drawn from the table, and how a command runs:
a refusal of the project's own (`utils/errors.py`) is one line and exit status 2; any other error is a bug and keeps
its traceback."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..utils.errors import UserInputError


@dataclass(frozen=True)
class Command:
    """One `dpt-peft <name>` command: `parser` builds its flags and help (the one source of its texts, also for the
    help files the launcher ships), `run(argv)` parses and calls the library; `subcommands` (`data check`) have
    their own help."""

    name: str
    parser: Callable[[], argparse.ArgumentParser]
    run: Callable[[list[str] | None], Any]
    subcommands: dict[str, Callable[[], argparse.ArgumentParser]] = field(default_factory=dict)

    @property
    def description(self) -> str:
        return self.parser().description or ""

    def help_texts(self) -> dict[str, str]:
        """The help of the command and of each subcommand (`data check` -> `data-check`), by help-file name."""
        texts = {self.name: self.parser().format_help()}
        return texts | {f"{self.name}-{sub}": build().format_help() for sub, build in self.subcommands.items()}


def overview(commands: Iterable[Command]) -> str:
    """What `dpt-peft --help` prints: each command with the first line of its description."""
    commands = list(commands)
    lines = [f"usage: dpt-peft {{{','.join(c.name for c in commands)}}} [--help] ...", "", "commands:"]
    lines += [f"  {c.name:10} {c.description.splitlines()[0]}" for c in commands]
    lines += ["", "`dpt-peft <command> --help` lists a command's flags."]
    return "\n".join(lines) + "\n"


def run_command(command: Callable[[list[str]], Any], argv: list[str], verbose: bool = False) -> Any:
    """`command(argv)`; a refusal (`UserInputError`) becomes one line on stderr and exit status 2 (with `verbose`,
    the traceback first). Anything else propagates with its traceback: it is a bug, not the user's input."""
    try:
        return command(argv)
    except UserInputError as err:
        if verbose:
            traceback.print_exc()
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"dpt-peft: error: {message}", file=sys.stderr)
        raise SystemExit(2) from err
