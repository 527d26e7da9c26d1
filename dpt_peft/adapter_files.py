"""A saved adapter read with bounds, and checked against its config before any module is built.

A downloaded adapter is someone else's file. Its config says how many prompts to allocate; its weights file says, in a
header of a few kilobytes, what it really holds. Comparing the two first makes a hostile or corrupted config cost
milliseconds to refuse (a config claiming 30 million visual prompts would otherwise allocate gigabytes before the
weights are compared), and every refusal names the field and the fix.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .utils.errors import MissingInputError, UserInputError
from .utils.write_policy import read_json

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"  # PEFT's CONFIG_NAME, spelled here to keep this module free of PEFT
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "name" or "namespace/name"
MAX_CONFIG_BYTES = 64 * 2**20  # a config with a million class names is about 20 MB
MAX_HEADER_BYTES = 16 * 2**20  # safetensors' own limit is 100 MB; a DPT adapter's header holds a few hundred keys

_VISUAL = re.compile(r"layers\.(\d+)\.dpt_visual_prompts$")
_CLASSIFIER = re.compile(r"layers\.(\d+)\.dpt_class_aware\.classifier\.weight$")
_KV_TOKENS = re.compile(r"layers\.(\d+)\.dpt_class_aware\.kv_tokens$")
_QUERY = re.compile(r"layers\.(\d+)\.dpt_class_aware\.q_proj\.weight$")
_CONTEXT = re.compile(r"\.dpt_context$")


class AdapterFileError(UserInputError):
    """A saved adapter that cannot be used as it is: incomplete, too large, truncated, or not matching its own
    config (a `ValueError`, as PEFT's own refusals are)."""


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """adapter_config.json, refused above `MAX_CONFIG_BYTES` before it is read."""
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise AdapterFileError(
            f"{path} is {size / 2**20:.0f} MiB, more than the {MAX_CONFIG_BYTES // 2**20} MiB an adapter config can "
            "be; it is not a DPT adapter config (or is corrupt): save or download the adapter again."
        )
    return read_json(path, "the adapter's config", "save or download the adapter again.", mapping=True)


def saved_shapes(path: str | os.PathLike) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header, without reading the tensors.

    The header's length is bounded, and the data it describes must fit the file: a truncated download is named here.
    """
    path = Path(path)
    size = path.stat().st_size

    def damaged(detail: str) -> AdapterFileError:
        return AdapterFileError(
            f"Could not load the DPT adapter from {str(path.parent)!r}: {path.name} is truncated or corrupt "
            f"({detail}); save or download the adapter again."
        )

    with open(path, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise damaged(f"a header of {length} bytes in a file of {size}")
        try:
            header = json.loads(f.read(length))
            tensors = {key: entry for key, entry in header.items() if key != "__metadata__"}
            end = max((entry["data_offsets"][1] for entry in tensors.values()), default=0)
            shapes = {key: list(entry["shape"]) for key, entry in tensors.items()}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError) as err:
            raise damaged(f"unreadable header: {err}") from err
    if 8 + length + end > size:
        raise damaged(f"its header describes {8 + length + end} bytes, the file has {size}")
    return shapes


def _layers(pattern: re.Pattern, shapes: dict[str, list[int]]) -> dict[int, list[int]]:
    return {int(m.group(1)): shape for key, shape in shapes.items() if (m := pattern.search(key))}


def _num_classes(class_names: Any) -> int:
    tasks = class_names.values() if isinstance(class_names, dict) else [class_names]
    return sum(len(names) for names in tasks)


def check_class_count(raw_config: dict[str, Any], shapes: dict[str, list[int]], where: str) -> None:
    """The class count of a config as read (before a million names are validated one by one) against the weights'
    class-aware classifier, when it has one."""
    names = raw_config.get("class_names")
    counts = {shape[0] for shape in _layers(_CLASSIFIER, shapes).values()}
    if isinstance(names, (list, dict)) and counts and _num_classes(names) not in counts:
        raise AdapterFileError(
            f"The adapter file in {where!r} does not match its config: class_names=<{_num_classes(names)} names>, but "
            f"the class-aware classifier has {sorted(counts)} rows. The config or the weights were changed or "
            "corrupted: save or download the adapter again."
        )


def check_config_matches_weights(config: Any, shapes: dict[str, list[int]], where: str) -> None:
    """Every size the config would allocate equals what the weights file holds (a `DPTConfig` and `saved_shapes`)."""

    def refuse(found: str) -> None:
        raise AdapterFileError(
            f"The adapter file in {where!r} does not match its config: {found}. The config or the weights were "
            "changed or corrupted: save or download the adapter again."
        )

    def differs(field: str, saved: str, value: Any = None) -> None:
        refuse(f"{field}={getattr(config, field) if value is None else value!r}, but {saved}")

    classes = _num_classes(config.class_names)
    num_layers = config.vision_num_layers  # recorded when the adapter was made; None in a hand-written config
    visual, classifiers = _layers(_VISUAL, shapes), _layers(_CLASSIFIER, shapes)
    if num_layers is not None and set(visual) != set(config.visual_prompt_layers(num_layers)):
        differs("num_visual_tokens", f"deep prompts are saved for vision layers {sorted(visual)}")
    if num_layers is not None and set(classifiers) != set(config.class_aware_layers(num_layers)):
        differs("class_aware", f"class-aware prompts are saved for vision layers {sorted(classifiers)}")
    for index, shape in visual.items():
        if shape[0] != config.num_visual_tokens or config.vision_hidden_size not in (None, shape[-1]):
            differs("num_visual_tokens", f"layers.{index}.dpt_visual_prompts is {shape}")
    for index, shape in classifiers.items():
        if shape[0] != classes:
            differs("class_names", f"the class-aware classifier of layer {index} is {shape}", f"<{classes} names>")
    for pattern, field in ((_KV_TOKENS, "class_aware_num_kv_tokens"), (_QUERY, "class_aware_attention_dim")):
        for index, shape in _layers(pattern, shapes).items():
            if shape[0] != getattr(config, field):
                differs(field, f"layers.{index}.dpt_class_aware has {shape}")
    contexts = {key: shape for key, shape in shapes.items() if _CONTEXT.search(key)}
    if config.learn_text_context and not contexts:
        refuse("missing dpt_context (learn_text_context=True)")
    if contexts and not config.learn_text_context:
        differs("learn_text_context", f"{next(iter(contexts))} is saved")
    for key, shape in contexts.items():
        if config.text_init is None and shape[-2] != config.num_text_tokens:
            differs("num_text_tokens", f"{key} is {shape}")
        if config.class_specific_context and shape[0] != classes:
            differs("class_names", f"{key} is {shape}", f"<{classes} names>")
        if config.text_hidden_size not in (None, shape[-1]):
            differs("text_hidden_size", f"{key} is {shape}")


@dataclass(frozen=True)
class LocalAdapter:
    """An adapter folder on this machine as checked once: its config as read and its weights' tensor shapes, handed on
    so that parsing the config and comparing its sizes read neither file again."""

    folder: Path
    raw_config: dict[str, Any]
    shapes: dict[str, list[int]]


def read_local_adapter(path: str | os.PathLike, subfolder: str | None = None) -> LocalAdapter | None:
    """The adapter folder at `path` checked before anything is built from it, or None (a Hub id: PEFT downloads it).

    A folder on this machine must be a complete adapter: a path that does not exist (and cannot be a Hub id), a file,
    a folder without `adapter_config.json` or `WEIGHTS_NAME`, a config that is not a JSON mapping or is too large,
    and a weights file that is truncated or whose class-aware classifier does not fit the config's class count are
    refused naming the path and the fix, not found to be wrong after the base model has loaded.
    """
    folder = Path(path, subfolder) if subfolder else Path(path)
    expected = f"give the folder save_pretrained wrote (it holds {CONFIG_FILE} and {WEIGHTS_NAME})"
    if not folder.exists():
        if _HUB_ID.fullmatch(str(path)) and not subfolder:
            return None
        raise MissingInputError(f"The adapter folder {str(folder)!r} does not exist; {expected}, or a Hub id.")
    if not folder.is_dir():
        raise AdapterFileError(
            f"The adapter {str(folder)!r} is a file, not a folder; give the folder that holds the adapter "
            f"({str(folder.parent)!r} if that is one), as save_pretrained wrote it."
        )
    if not (folder / CONFIG_FILE).is_file():
        raise AdapterFileError(f"The adapter folder {str(folder)!r} holds no {CONFIG_FILE}; {expected}.")
    raw_config = read_config_json(folder / CONFIG_FILE)
    weights = folder / WEIGHTS_NAME
    if (folder / "adapter_model.bin").exists() and not weights.is_file():
        raise AdapterFileError(
            f"The adapter folder {str(folder)!r} holds adapter_model.bin, a pickle, and no {WEIGHTS_NAME}: dpt_peft "
            "loads only safetensors, which cannot run code. Re-save it with save_pretrained where it was made."
        )
    if not weights.is_file():
        raise AdapterFileError(f"The adapter folder {str(folder)!r} holds no {WEIGHTS_NAME}; {expected}.")
    shapes = saved_shapes(weights)
    check_class_count(raw_config, shapes, str(folder))
    return LocalAdapter(folder, raw_config, shapes)
