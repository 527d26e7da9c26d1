"""Class names as users give them: the text each contributes to its prompt, how repeats are told apart, what is
refused (empty lists and names), and what is only warned about (repeated names, which real class lists have)."""

from __future__ import annotations

import re
import unicodedata
import warnings

from .utils.errors import UserInputError

ClassNames = list[str] | dict[str, list[str]]
DEFAULT_TASK = "default"
_WHITESPACE = re.compile(r"\s+")


def normalize_class_name(name: str) -> str:
    """The text a class name contributes to its prompt: NFC-normalized (one spelling of "café", composed or not),
    ``_`` turned into spaces as CoOp does, whitespace collapsed."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", name).replace("_", " ")).strip()


def display_names(class_names: list[str]) -> list[str]:
    """Names that tell repeated classes apart in reports: the second "missile" is "missile (2)", as labels are
    indices and a data set may name two classes alike (CLIP's ImageNet list does)."""
    seen: dict[str, int] = {}
    shown = []
    for name in class_names:
        key = normalize_class_name(name).lower()
        seen[key] = seen.get(key, 0) + 1
        shown.append(name if seen[key] == 1 else f"{name} ({seen[key]})")
    return shown


def validate_class_names(class_names: ClassNames | None) -> None:
    if class_names is None:
        raise UserInputError("class_names is required: pass the list of class names, e.g. ['cat', 'dog'].")
    tasks = class_names if isinstance(class_names, dict) else {DEFAULT_TASK: class_names}
    if not tasks:
        raise UserInputError("class_names is an empty dict; give at least one task with its class names.")
    for task, names in tasks.items():
        where = "class_names" if not isinstance(class_names, dict) else f"class_names[{task!r}]"
        if isinstance(names, str) or not isinstance(names, (list, tuple)):
            raise UserInputError(f"{where} must be a list of strings, got {type(names).__name__}.")
        if not names:
            raise UserInputError(f"{where} is empty; give at least one class name.")
        seen: dict[str, list[str]] = {}
        for index, name in enumerate(names):
            normalized = normalize_class_name(name) if isinstance(name, str) else ""
            if not normalized:
                raise UserInputError(f"{where}[{index}]={name!r} is empty; every class needs a non-empty name.")
            if any(unicodedata.category(character) == "Cc" for character in name):
                raise UserInputError(
                    f"{where}[{index}]={name!r} holds a control character (a line break, a terminal escape, NUL); "
                    "class names are plain text: remove it."
                )
            seen.setdefault(normalized.lower(), []).append(name)
        repeated = [spellings for spellings in seen.values() if len(spellings) > 1]
        if repeated:
            warnings.warn(
                f"{where} names {len(repeated)} class(es) more than once ("
                + "; ".join(" and ".join(repr(s) for s in spellings) for spellings in repeated[:5])
                + "): those classes get the same prompt, so they can only be told apart by their visual side. "
                "Labels are indices, so this is allowed (CLIP's ImageNet list names 'missile' and 'sunglasses' "
                "twice); reports show the repeats as 'name (2)'.",
                UserWarning,
                stacklevel=5,
            )
