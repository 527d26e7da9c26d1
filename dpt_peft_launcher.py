"""The `dpt-peft` console script. `--help` is answered from the texts in dpt_peft/cli/help/ (written from the command
table, see dpt_peft/cli/help_files.py) without importing the package: any `dpt_peft` import registers DPT with PEFT,
which imports torch and transformers (seconds). Everything else runs `dpt_peft.cli.main`."""

from __future__ import annotations

import sys
from importlib.util import find_spec
from pathlib import Path

HELP_FLAGS = ("-h", "--help")
OVERVIEW = "dpt-peft"


def help_dir() -> Path | None:
    """The shipped help folder, found without running dpt_peft/__init__.py (`find_spec` of a top-level package only
    locates it), in an editable install as in a wheel."""
    spec = find_spec("dpt_peft")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "cli" / "help"


def help_name(argv: list[str], shipped: set[str]) -> str | None:
    """The shipped help text `argv` asks for: the overview, a command's, or a subcommand's (`data check` ->
    `data-check`); None when it asks for more (a run, or a command with no shipped text)."""
    if not argv or argv[0] in HELP_FLAGS:
        return OVERVIEW if OVERVIEW in shipped else None
    words = argv[:2] if "-".join(argv[:2]) in shipped else argv[:1]
    name = "-".join(words)
    flags = argv[len(words) :]
    flags = flags[: flags.index("--")] if "--" in flags else flags
    return name if name in shipped and any(flag in HELP_FLAGS for flag in flags) else None


def main() -> None:
    argv = sys.argv[1:]
    folder = help_dir()
    shipped = {path.stem for path in folder.glob("*.txt")} if folder and folder.is_dir() else set()
    name = help_name(argv, shipped)
    if name is None:  # a run, an unknown command (the full CLI says so), or no shipped text
        from dpt_peft.cli import main as run

        run(argv)
        return
    print((folder / f"{name}.txt").read_text(), end="", file=sys.stdout if argv else sys.stderr)
    raise SystemExit(0 if argv else 2)  # bare `dpt-peft`: the overview as the usage error it is


if __name__ == "__main__":
    main()
