"""The `dpt-peft` console script. `--help` is answered from the texts in dpt_peft/cli/help/ (written from the real
parsers, see dpt_peft/cli/help_files.py) without importing the package: any `dpt_peft` import registers DPT with
PEFT, which imports torch and transformers (seconds). Everything else runs `dpt_peft.cli.main`."""

from __future__ import annotations

import sys
from importlib.util import find_spec
from pathlib import Path

HELP_FLAGS = ("-h", "--help")


def help_name(argv: list[str]) -> str | None:
    """The help text `argv` asks for (`dpt-peft`, a command, or `data-check`); None when it asks for more."""
    if not argv or argv[0] in HELP_FLAGS:
        return "dpt-peft"
    words = argv[:2] if argv[:2] == ["data", "check"] else argv[:1]
    flags = argv[len(words) :]
    flags = flags[: flags.index("--")] if "--" in flags else flags
    return "-".join(words) if any(flag in HELP_FLAGS for flag in flags) else None


def help_text(name: str) -> str | None:
    """The shipped text, found without running dpt_peft/__init__.py (`find_spec` of a top-level package only
    locates it), in an editable install as in a wheel."""
    spec = find_spec("dpt_peft")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "cli" / "help" / f"{name}.txt"
    return path.read_text() if path.is_file() else None


def main() -> None:
    argv = sys.argv[1:]
    name = help_name(argv)
    text = help_text(name) if name else None
    if text is None:  # a run, an unknown command (the full CLI says so), or no shipped text
        from dpt_peft.cli import main as run

        run(argv)
        return
    print(text, end="", file=sys.stdout if argv else sys.stderr)
    raise SystemExit(0 if argv else 2)  # bare `dpt-peft`: the overview as the usage error it is


if __name__ == "__main__":
    main()
