"""The flags of `dpt-peft train`, built from the fields of `TrainArguments` and `DPTConfig`, and a .json/.yaml file
as the sole argument (as HfArgumentParser takes one); also the training flags that grid commands pass on."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Literal

import yaml

from ..config import DPTConfig
from ..training.arguments import CONFIG_FLAGS, TrainArguments


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, hint, default) -> None:
    options: dict = {"default": default, "help": f.metadata.get("help")}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        options["choices"] = list(args)
    elif origin is list:
        options.update(nargs="+", type=args[0])
    elif hint is bool:
        options.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
    else:
        options["type"] = hint
    names = [f"--{f.name}", *f.metadata.get("aliases", ())]  # TrainingArguments' names, as HfArgumentParser takes
    names += [name.replace("_", "-") for name in names if "_" in name]  # --output-dir
    parser.add_argument(*names, dest=f.name, **options)


def build_parser(only_given: bool = False) -> argparse.ArgumentParser:
    """The flags of `train`: every TrainArguments field, then every user-settable DPTConfig field. `only_given`:
    flags that are not on the command line are left out of the result (for flags passed on to many runs)."""
    parser = argparse.ArgumentParser(
        description="Train a DPT adapter on a frozen CLIP (defaults: the embedded toy task).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(TrainArguments)
    for f in dataclasses.fields(TrainArguments):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        _add_field(parser, f, hints[f.name], argparse.SUPPRESS if only_given else default)
    group = parser.add_argument_group("DPTConfig (override the --method preset)")
    config_hints = typing.get_type_hints(DPTConfig)
    config_fields = {f.name: f for f in dataclasses.fields(DPTConfig)}
    for name in CONFIG_FLAGS:
        _add_field(group, config_fields[name], config_hints[name], argparse.SUPPRESS if only_given else None)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[TrainArguments, dict]:
    """Training arguments, and the run's DPTConfig values: those given on the command line (or in a .json/.yaml file
    given as the sole argument, as HfArgumentParser takes one) plus its dataset's."""
    if argv and len(argv) == 1 and argv[0].endswith(CONFIG_FILE_SUFFIXES):
        return _parse_config_file(argv[0])
    namespace = vars(build_parser().parse_args(argv))
    given = {k: namespace.pop(k) for k in CONFIG_FLAGS}
    args = TrainArguments(**namespace)
    return args, args.config_overrides({k: v for k, v in given.items() if v is not None})


CONFIG_FILE_SUFFIXES = (".json", ".yaml", ".yml")


def _parse_config_file(path: str) -> tuple[TrainArguments, dict]:
    """`dpt-peft train run.yaml`: the file's keys are the flags' names (TrainingArguments' aliases too)."""
    with open(path) as f:
        values = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    if not isinstance(values, dict):
        raise SystemExit(f"{path} must hold a mapping of flag names to values, e.g. `epochs: 10`.")
    names = {
        alias.lstrip("-"): f.name for f in dataclasses.fields(TrainArguments) for alias in f.metadata.get("aliases", ())
    }
    values = {names.get(key, key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainArguments)} - set(CONFIG_FLAGS))
    if unknown:
        raise SystemExit(f"{path}: unknown setting(s) {unknown}; `dpt-peft train --help` lists every flag.")
    given = {k: values.pop(k) for k in CONFIG_FLAGS if k in values}
    args = TrainArguments(**values)
    return args, args.config_overrides(given)


def parse_given_flags(argv: list[str]) -> tuple[dict, dict]:
    """The training flags in `argv` as (TrainArguments values, DPTConfig values), only those given: what a grid
    command passes on to every run."""
    given = vars(build_parser(only_given=True).parse_args(argv))
    config = {k: given.pop(k) for k in CONFIG_FLAGS if k in given}
    return given, config
