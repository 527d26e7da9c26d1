"""The flags of `dpt-peft train`: `transformers.HfArgumentParser` over `TrainArguments` (shown as a training and a
data group) and the DPTConfig overrides (a third group), a .json/.yaml file as the sole argument, the training flags
that grid commands pass on, and the help format of every command."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from collections.abc import Iterable

from transformers import HfArgumentParser

from ..config import METHOD_PRESETS, DPTConfig
from ..training.arguments import CONFIG_FLAGS, SHIPPED_CONFIG_DEFAULTS, TrainArguments
from ..training.lora_arguments import LORA_FIELDS
from ..utils.write_policy import UserInputError, read_json

CONFIG_FILE_SUFFIXES = (".json", ".yaml", ".yml")
# TrainArguments fields listed under "data arguments" in `train --help`: one dataclass, so a run stays one object and
# `HfArgumentParser(TrainArguments)` keeps working for users; the grouping is only the help's.
DATA_FIELDS = (
    "dataset",
    "data_root",
    "split_file",
    "subsample_classes",
    "tasks",
    "task_sampling",
    "image_column",
    "label_column",
    "class_names_file",
    "train_split",
    "test_split",
    "shots",
    "augment",
    "min_crop_scale",
    "input_pipeline",
    "dataloader_num_workers",
    "skip_missing_images",
)
# Fixed, so that help is the same on every terminal: the launcher (dpt_peft_launcher.py) prints it from text files.
HELP_WIDTH = 100
TRAIN_DESCRIPTION = """Train a DPT adapter on a frozen CLIP (defaults: the embedded toy task).

Flags as transformers' HfArgumentParser parses them: TrainingArguments' names where they exist, every flag also with
dashes (--output-dir), a bare boolean flag means true (--save_best, or --save_best false), and a .json/.yaml file of
flag names and values may be the sole argument (dpt-peft train run.yaml)."""


def help_with_default(action: argparse.Action) -> str:
    """An action's help with its default shown once: as the help words it, else appended (not for None: unset)."""
    text = action.help or ""
    unset = action.default in (None, argparse.SUPPRESS) or action.nargs == 0  # nargs 0: a switch, off unless given
    if "default" in text.lower() or unset or not action.option_strings:
        return text
    default = action.default
    shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
    return f"{text} (default: {shown.replace('%', '%%')})"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, each default once, a flag's names with one metavar and without their dash forms, and
    a fixed width."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=HELP_WIDTH, max_help_position=32)

    def _get_help_string(self, action: argparse.Action) -> str:
        return help_with_default(action)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        names = [name for name in action.option_strings if name not in _dash_forms(action.option_strings)]
        if action.nargs == 0:
            return ", ".join(names)
        return ", ".join(names) + " " + self._format_args(action, self._get_default_metavar_for_optional(action))


def _dash_forms(names: Iterable[str]) -> set[str]:
    """`--output-dir` for `--output_dir`: HfArgumentParser accepts both."""
    return {"--" + name[2:].replace("_", "-") for name in names if "_" in name}


def _override_help(f: dataclasses.Field) -> str:
    """A DPTConfig field's help with the defaults it overrides: the config's, the --method preset's, the shipped toy
    models'."""
    sources = [f"DPTConfig's default: {f.default}"]
    if any(f.name in preset for preset in METHOD_PRESETS.values()):
        sources.append("--method sets it")
    sources += [f"{values[f.name]} on {model}" for model, values in SHIPPED_CONFIG_DEFAULTS.items() if f.name in values]
    return f"{f.metadata['help']} ({'; '.join(sources)})"


def _overrides_dataclass() -> type:
    """Every user-settable DPTConfig field, optional: None (not given) leaves the --method preset's value."""
    hints = typing.get_type_hints(DPTConfig)
    config_fields = {f.name: f for f in dataclasses.fields(DPTConfig)}
    return dataclasses.make_dataclass(
        "DPTConfigOverrides",
        [
            (name, hints[name] | None, dataclasses.field(default=None, metadata={"help": _override_help(f)}))
            for name, f in ((name, config_fields[name]) for name in CONFIG_FLAGS)
        ],
    )


DPTConfigOverrides = _overrides_dataclass()


class TrainArgumentParser(HfArgumentParser):
    """HfArgumentParser over `TrainArguments` and `DPTConfigOverrides`, each field added by HfArgumentParser's own
    field parser into its help group. Beyond HfArgumentParser: the dash forms of aliases (--num-train-epochs), and
    a bare optional boolean flag (--torch_compile, default None) means true. `only_given`: flags not on the command
    line are left out of the result (the flags a grid passes on to every run)."""

    def __init__(self, only_given: bool = False) -> None:
        super().__init__(prog="dpt-peft train", description=TRAIN_DESCRIPTION, formatter_class=HelpFormatter)
        groups = {
            "training": self.add_argument_group("training arguments"),
            "data": self.add_argument_group("data arguments"),
            "lora": self.add_argument_group("LoRA arguments (--method lora; defaults: CLIP-LoRA's recipe)"),
            "config": self.add_argument_group("DPTConfig overrides (of the --method preset)"),
        }
        train_hints = typing.get_type_hints(TrainArguments)
        for f in dataclasses.fields(TrainArguments):
            group = "data" if f.name in DATA_FIELDS else "lora" if f.name in LORA_FIELDS else "training"
            self.add_field(groups[group], f, train_hints[f.name])
        for f in dataclasses.fields(DPTConfigOverrides):
            self.add_field(groups["config"], f, f.type)
        self.dataclass_types = [TrainArguments, DPTConfigOverrides]
        if only_given:
            for action in self._actions:
                action.default = argparse.SUPPRESS

    @classmethod
    def add_field(cls, container, f: dataclasses.Field, hint, aliases: Iterable[str] = ()) -> None:
        """One flag as HfArgumentParser makes it, from a copy of the field (HfArgumentParser rewrites its type), with
        the dash forms of its aliases, and a bare flag meaning true for `bool | None` (HfArgumentParser wants a
        value there)."""
        field = copy.copy(f)
        field.type = hint
        names = [*f.metadata.get("aliases", ()), *aliases]
        bare_true = {"nargs": "?", "const": True} if hint == bool | None else {}
        sized = next((a for a in typing.get_args(hint) if typing.get_origin(a) is tuple), None)
        if sized is not None:  # a fixed-size tuple (--consistency_weights 10 25 1): that many values of its type
            field.type = typing.get_args(sized)[0] | None
            bare_true = {"nargs": len(typing.get_args(sized)), "metavar": "W"}
        field.metadata = types.MappingProxyType({**f.metadata, **bare_true, "aliases": [*names, *_dash_forms(names)]})
        cls._parse_dataclass_field(container, field)

    def parse_train_args(self, argv: list[str] | None) -> tuple[TrainArguments, dict]:
        """TrainArguments and the DPTConfig values given (argparse's errors for unknown flags, as today)."""
        namespace = vars(self.parse_args(argv))
        given = {k: namespace.pop(k) for k in CONFIG_FLAGS}
        return TrainArguments(**namespace), {k: v for k, v in given.items() if v is not None}


def build_parser(only_given: bool = False) -> TrainArgumentParser:
    """The parser of `train` (see `TrainArgumentParser`)."""
    return TrainArgumentParser(only_given)


def add_train_fields(parser: argparse.ArgumentParser, names: dict[str, list[str]]) -> None:
    """TrainArguments fields as another command's flags (same names, types, defaults and help as `train`'s), each
    with extra aliases: `evaluate` takes train's data flags."""
    fields = {f.name: f for f in dataclasses.fields(TrainArguments)}
    hints = typing.get_type_hints(TrainArguments)
    for name, aliases in names.items():
        TrainArgumentParser.add_field(parser, fields[name], hints[name], aliases)


def parse_args(argv: list[str] | None = None) -> tuple[TrainArguments, dict]:
    """Training arguments, and the run's DPTConfig values: those given on the command line (or in a .json/.yaml file
    given as the first argument, as HfArgumentParser takes one, then flags that override it) plus its dataset's."""
    if argv and not argv[0].startswith("-"):  # train takes no positional argument but a settings file
        args, given = _parse_config_file(argv[0], argv[1:])
    else:
        args, given = build_parser().parse_train_args(argv)
    return args, args.config_overrides(given)


SETTINGS_MAX_BYTES = 1 << 20  # a settings file is a few hundred bytes of flag names and values
SETTINGS_FIX = "give a mapping of flag names to values, e.g. `epochs: 10`."


def _parse_config_file(path: str, flags: list[str]) -> tuple[TrainArguments, dict]:
    """`dpt-peft train run.yaml [flags]`: the file's keys are the flags' names (TrainingArguments' aliases, dashes
    too), each value checked against its field's type (a value is never read as a flag); flags after the file
    override it."""
    if not path.lower().endswith(CONFIG_FILE_SUFFIXES):
        raise UserInputError(
            f"{path}: train takes flags, or a settings file ({', '.join(CONFIG_FILE_SUFFIXES)}) then flags; "
            "`dpt-peft train --help` lists every flag."
        )
    values = read_json(path, "train's settings", SETTINGS_FIX, mapping=True, max_bytes=SETTINGS_MAX_BYTES)
    aliases = {
        alias.lstrip("-"): f.name for f in dataclasses.fields(TrainArguments) for alias in f.metadata.get("aliases", ())
    }
    hints = {
        **typing.get_type_hints(TrainArguments),
        **{f.name: f.type for f in dataclasses.fields(DPTConfigOverrides)},
    }
    settings = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise UserInputError(f"{path}: the key {key!r} is not a flag name; {SETTINGS_FIX}")
        name = aliases.get(key.replace("-", "_"), key.replace("-", "_"))
        if name not in hints:
            raise UserInputError(f"{path}: unknown setting {key!r}; `dpt-peft train --help` lists every flag.")
        if value is not None:  # null: the flag's default
            settings[name] = checked_setting(value, hints[name], f"{path}: {key}")
    settings.update(vars(build_parser(only_given=True).parse_args(flags)))
    config = {name: settings.pop(name) for name in CONFIG_FLAGS if name in settings}
    return TrainArguments(**settings), config


def checked_setting(value: object, hint: object, where: str) -> object:
    """`value` from a settings file if it has the type `hint` (a float may be written as an int), else a one-line
    refusal naming `where` and the type wanted."""
    options = [t for t in typing.get_args(hint) if t is not type(None)] if _is_union(hint) else [hint]
    kind = options[0] if len(options) == 1 else hint
    if typing.get_origin(kind) is list:
        if not isinstance(value, list):
            raise UserInputError(f"{where} is {value!r}, not a list; write it as [a, b].")
        (item,) = typing.get_args(kind)
        return [checked_setting(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if typing.get_origin(kind) is typing.Literal:
        if value not in typing.get_args(kind):
            raise UserInputError(f"{where} is {value!r}; choose one of {list(typing.get_args(kind))}.")
        return value
    wanted = {bool: "true or false", int: "a whole number", float: "a number", str: "a string (quoted)"}
    valid = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }
    if kind not in valid:
        raise UserInputError(f"{where} cannot be set from a settings file; pass it as a flag.")
    if not valid[kind]:
        raise UserInputError(f"{where} is {value!r} ({type(value).__name__}); give {wanted[kind]}.")
    return float(value) if kind is float else value


def _is_union(hint: object) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def parse_given_flags(argv: list[str]) -> tuple[dict, dict]:
    """The training flags in `argv` as (TrainArguments values, DPTConfig values), only those given: what a grid
    command passes on to every run."""
    given = vars(build_parser(only_given=True).parse_args(argv))
    config = {k: given.pop(k) for k in CONFIG_FLAGS if k in given}
    return given, config
