"""The CLI as a transformers user expects it: `dpt-peft --help` answers at once without torch, from texts that equal
what the real parsers print; every flag has help with its default shown once; train's flags parse as
HfArgumentParser parses TrainArguments, in three help groups; evaluate takes train's names."""

from __future__ import annotations

import argparse
import dataclasses
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import HfArgumentParser

import dpt_peft_launcher
from dpt_peft.cli import COMMANDS
from dpt_peft.cli.commands import overview
from dpt_peft.cli.help_files import HELP_DIR, PYTHON_VERSION_FILE, REGENERATE, help_texts
from dpt_peft.cli.parsers import ablation_parser, evaluate_parser
from dpt_peft.cli.train_args import DATA_FIELDS, build_parser, help_with_default, parse_args, parse_given_flags
from dpt_peft.training.arguments import CONFIG_FLAGS, TrainArguments
from dpt_peft.training.lora_arguments import LORA_FIELDS

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "peft", "dpt_peft")
# Runs the console script's function as `dpt-peft <argv>` would, then reports which heavy packages were imported.
RUN_LAUNCHER = """
import sys
import dpt_peft_launcher
sys.argv = ["dpt-peft", *sys.argv[1:]]
try:
    dpt_peft_launcher.main()
except SystemExit as exit:
    code = exit.code
print("imported:", sorted(name for name in {HEAVY} if name in sys.modules), "exit:", code, file=sys.stderr)
""".replace("{HEAVY}", repr(HEAVY))


def test_the_shipped_help_texts_are_what_the_parsers_print():
    """Exactly, on the Python that wrote them; on any other, every flag and help sentence is in them (argparse lays
    help out differently from one version to the next): the check never skips."""
    shipped = {path.stem: path.read_text() for path in HELP_DIR.glob("*.txt")}
    assert set(shipped) == set(help_texts()), f"help files missing or left over: run `{REGENERATE}`"
    if PYTHON_VERSION_FILE.read_text().strip() == ".".join(platform.python_version_tuple()[:2]):
        assert shipped == help_texts(), f"the shipped help texts are stale: run `{REGENERATE}`"
    for command in COMMANDS:
        parsers = {command.name: command.parser} | {f"{command.name}-{s}": p for s, p in command.subcommands.items()}
        for name, build in parsers.items():
            parser = build()
            shown = " ".join(shipped[name].split())
            for piece in _help_pieces(parser):
                assert piece in shown, f"{name}.txt lacks {piece!r}: run `{REGENERATE}`"


def _help_pieces(parser: argparse.ArgumentParser) -> list[str]:
    """What a help text says whatever argparse's layout: the description's first line, every flag, and the start
    of every flag's help (aliases may be laid out apart)."""
    pieces = [" ".join(parser.description.splitlines()[0].split())]
    for action in _actions(parser):
        if action.help != argparse.SUPPRESS:
            pieces += action.option_strings[:1]
            pieces.append(" ".join((action.help or "").split("%(")[0].replace("%%", "%").split())[:40])
    return [piece for piece in pieces if piece]


@pytest.mark.parametrize(
    ("argv", "name"),
    [(["--help"], "dpt-peft"), (["train", "--help"], "train"), (["evaluate", "-h"], "evaluate")]
    + [(["data", "check", "--data_root", "x", "--help"], "data-check"), (["data", "--help"], "data")],
)
def test_help_imports_no_torch_transformers_peft_or_dpt_peft(argv, name):
    completed = subprocess.run(
        [sys.executable, "-c", RUN_LAUNCHER, *argv], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert completed.stdout == (HELP_DIR / f"{name}.txt").read_text()
    assert completed.stderr.strip() == "imported: [] exit: 0"


def test_the_launcher_answers_only_help_and_forwards_everything_else():
    shipped = {path.stem for path in HELP_DIR.glob("*.txt")}
    assert shipped == {"dpt-peft", "data-check", *(command.name for command in COMMANDS)}  # the table, shipped
    assert dpt_peft_launcher.help_name([], shipped) == "dpt-peft"  # the overview, on stderr, as a usage error
    assert dpt_peft_launcher.help_name(["predict", "--adapter", "a", "-h"], shipped) == "predict"
    assert dpt_peft_launcher.help_name(["data", "check", "-h"], shipped) == "data-check"
    runs = [["train", "--epochs", "1"], ["train", "run.yaml"], ["predict", "--adapter", "a", "--", "--help"]]
    for run in [*runs, ["../../x", "--help"], ["python_version", "-h"]]:  # only the table's names are texts
        assert dpt_peft_launcher.help_name(run, shipped) is None


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every action, and the listed subcommands (`data check`) as their help lines."""
    actions = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            actions += action._choices_actions
        else:
            actions.append(action)
    return actions


PARSERS = {command.name: command.parser for command in COMMANDS}


@pytest.mark.parametrize("name", PARSERS)
def test_every_flag_has_help_and_shows_its_default_once(name):
    for action in _actions(PARSERS[name]()):
        assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
        shown = help_with_default(action).lower()
        assert shown.count("default") <= 1, f"{name}: {action.option_strings}: {shown}"
    text = PARSERS[name]().format_help()
    assert "(default: None)" not in text and "default: ==SUPPRESS==" not in text


def test_the_overview_gives_each_command_a_whole_sentence():
    lines = overview(COMMANDS).splitlines()
    for command in COMMANDS:
        summary = command.description.splitlines()[0]
        assert summary.endswith(".") and f"  {command.name:10} {summary}" in lines


# Argument lists a TrainingArguments user would write, each in HfArgumentParser's own syntax.
HF_ARGV = [
    [],
    ["--num_train_epochs", "2", "--per_device_train_batch_size", "4", "--output-dir", "runs/x"],
    ["--report_to", "tensorboard", "wandb", "--save_total_limit", "3", "--seed", "7"],
    ["--eval_strategy", "epoch", "--load_best_model_at_end", "--mixed_precision", "bf16"],
    ["--augment", "false", "--torch_compile", "true", "--test_split", "validation", "--shots", "4"],
    ["--method", "coop", "--save_best", "no", "--eval_every", "2", "--dataset", "toy-shape", "--text_lr", "0.01"],
]


@pytest.mark.parametrize("argv", HF_ARGV)
def test_train_parses_as_hfargumentparser_over_trainarguments(argv):
    (expected,) = HfArgumentParser(TrainArguments).parse_args_into_dataclasses(argv, look_for_args_file=False)
    assert parse_args(argv)[0] == expected


def test_our_extensions_of_hfargumentparser():
    """A bare optional boolean is true (HfArgumentParser wants a value there), aliases take dashes too, and the
    DPTConfig overrides are only those given."""
    args, given = build_parser().parse_train_args(["--torch_compile", "--num-train-epochs", "3", "--class_aware"])
    assert (args.torch_compile, args.epochs, given) == (True, 3, {"class_aware": True})
    assert parse_given_flags(["--epochs", "2", "--num_text_tokens", "3"]) == ({"epochs": 2}, {"num_text_tokens": 3})


def test_train_help_has_a_training_a_data_and_a_dptconfig_group():
    groups = {group.title: {action.dest for action in group._group_actions} for group in build_parser()._action_groups}
    fields = {f.name for f in dataclasses.fields(TrainArguments)}
    assert groups["data arguments"] == set(DATA_FIELDS)
    assert groups["LoRA arguments (--method lora; defaults: CLIP-LoRA's recipe)"] == set(LORA_FIELDS)
    assert groups["training arguments"] == fields - set(DATA_FIELDS) - set(LORA_FIELDS)
    assert groups["DPTConfig overrides (of the --method preset)"] == set(CONFIG_FLAGS)


def test_grid_commands_pass_trains_flags_on_instead_of_reading_them_as_abbreviations():
    args, extra = ablation_parser().parse_known_args(["--seeds", "1", "--seed", "5"])
    assert args.seeds == [1] and parse_given_flags(extra) == ({"seed": 5}, {})


def test_evaluate_takes_trains_names_and_keeps_its_old_ones():
    new = evaluate_parser().parse_args(["--adapter", "a", "--test_split", "val", "--eval_batch_size", "8"])
    old = evaluate_parser().parse_args(["--adapter", "a", "--split", "val", "--batch_size", "8"])
    assert new == old and (new.test_split, new.eval_batch_size) == ("val", 8)
    train = {action.dest: action for action in build_parser()._actions}
    shared = [a for a in evaluate_parser()._actions if a.dest in {*DATA_FIELDS, "eval_batch_size"} - {"test_split"}]
    assert len(shared) == 7
    for action in shared:
        assert (action.option_strings[0], action.default, action.help) == (
            train[action.dest].option_strings[0],
            train[action.dest].default,
            train[action.dest].help,
        )
