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
            "config": self.add_argument_group("DPTConfig overrides (of the --method preset)"),
        }
        train_hints = typing.get_type_hints(TrainArguments)
        for f in dataclasses.fields(TrainArguments):
            self.add_field(groups["data" if f.name in DATA_FIELDS else "training"], f, train_hints[f.name])
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
    given as the sole argument, as HfArgumentParser takes one) plus its dataset's."""
    if argv and len(argv) == 1 and argv[0].endswith(CONFIG_FILE_SUFFIXES):
        args, given = _parse_config_file(argv[0])
    else:
        args, given = build_parser().parse_train_args(argv)
    return args, args.config_overrides(given)


def _parse_config_file(path: str) -> tuple[TrainArguments, dict]:
    """`dpt-peft train run.yaml`: the file's keys are the flags' names (TrainingArguments' aliases, dashes too)."""
    values = read_json(path, "train's settings", "give a mapping of flag names to values, e.g. `epochs: 10`.", True)
    names = {
        alias.lstrip("-"): f.name for f in dataclasses.fields(TrainArguments) for alias in f.metadata.get("aliases", ())
    }
    values = {names.get(key.replace("-", "_"), key.replace("-", "_")): value for key, value in values.items()}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainArguments)} - set(CONFIG_FLAGS))
    if unknown:
        raise UserInputError(f"{path}: unknown setting(s) {unknown}; `dpt-peft train --help` lists every flag.")

    def text(value) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    argv = []  # the values as flags, so that the file's types are checked exactly as the command line's
    for name, value in values.items():
        if isinstance(value, list):
            argv += [f"--{name}", *map(text, value)]
        elif value is not None:
            argv.append(f"--{name}={text(value)}")
    parser = build_parser()
    parser.exit_on_error = False  # a wrong type is named with the file, in one line
    try:
        return parser.parse_train_args(argv)
    except argparse.ArgumentError as err:
        raise UserInputError(f"{path}: {err}; `dpt-peft train --help` lists every flag and its type.") from err


def parse_given_flags(argv: list[str]) -> tuple[dict, dict]:
    """The training flags in `argv` as (TrainArguments values, DPTConfig values), only those given: what a grid
    command passes on to every run."""
    given = vars(build_parser(only_given=True).parse_args(argv))
    config = {k: given.pop(k) for k in CONFIG_FLAGS if k in given}
    return given, config
