"""The project's refusal types: what the CLI prints as one line (what, why, the fix) and exits 2 on.

Every check of a user's input or environment raises one of these; anything else escaping a command is a bug, and the
CLI keeps its traceback (`cli/commands.py: run_command`). They subclass the builtin a library user would catch
(`ValueError`, `FileNotFoundError`), so `except ValueError` around a library call keeps working. This module imports
nothing, so every layer may use it.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """A refusal of the user's input or environment, with a message that says what, why and the fix."""


class OutputRefused(UserInputError):
    """Writing where asked would replace or delete something dpt_peft did not write, or cannot succeed."""


class MissingInputError(UserInputError, FileNotFoundError):
    """A file or folder the user named (an image, an adapter, a data root) does not exist or cannot be read."""


class InputTypeError(UserInputError, TypeError):
    """An argument of the wrong type (a list where a tensor goes, a model of an unsupported class)."""


class DownloadError(UserInputError, ConnectionError):
    """A file the user pointed at by URL could not be fetched (network, server, size cap)."""


class DownloadTimeout(DownloadError, TimeoutError):
    """A download ran past its deadline."""
