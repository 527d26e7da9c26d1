"""Issue #20 item 7: every bad input a user can give a command is one line (what, why, the fix) naming the file or
flag, exit status 2, and refused before any model loads; the library's loaders raise the same named errors.

Each case was a raw `TypeError`/`JSONDecodeError`/`OSError`/`AttributeError`, a traceback, exit status 1, a message
naming the wrong thing, or a failure after the base model had loaded (docs/reliability.md section 12 lists which).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

import pytest
import torch
import transformers
from coop_layouts import make_layout
from helpers import CLASS_NAMES
from peft import get_peft_model
from PIL import Image as PILImage
from transformers import CLIPModel

from dpt_peft import DPTConfig
from dpt_peft.cli import main, parse_args
from dpt_peft.integrations.auto import AutoDPTModel
from dpt_peft.sources import load_adapted_model

ADAPTER_DAMAGE = {  # folder name -> what is done to a good adapter folder
    "no_config": lambda a: (a / "adapter_config.json").unlink(),
    "config_truncated": lambda a: _truncate(a / "adapter_config.json", 100),
    "config_binary": lambda a: (a / "adapter_config.json").write_bytes(b"\x82\xff" + bytes(range(200))),
    "config_list": lambda a: (a / "adapter_config.json").write_text("[1, 2]"),
    "config_string_int": lambda a: _edit_config(a, num_text_tokens="16"),
    "config_string_bool": lambda a: _edit_config(a, learn_text_context="no"),
    "weights_truncated": lambda a: _truncate(a / "adapter_model.safetensors", 300),
    "weights_text": lambda a: (a / "adapter_model.safetensors").write_text("hello"),
    "weights_missing": lambda a: (a / "adapter_model.safetensors").unlink(),
    "weights_pickle_only": lambda a: (a / "adapter_model.safetensors").rename(a / "adapter_model.bin"),
}
ADAPTER_MESSAGES = {
    "missing": r"adapter folder '{w}/missing' does not exist; give the folder save_pretrained wrote",
    "a_file": r"adapter '{w}/a_file' is a file, not a folder",
    "no_config": r"adapter folder '{w}/no_config' holds no adapter_config.json",
    "config_truncated": r"{w}/config_truncated/adapter_config.json \(the adapter's config\) cannot be read",
    "config_binary": r"{w}/config_binary/adapter_config.json \(the adapter's config\) cannot be read: 'utf-8' codec",
    "config_list": r"{w}/config_list/adapter_config.json \(the adapter's config\) holds a list, not a mapping",
    "config_string_int": r"num_text_tokens='16' must be a whole number",
    "config_string_bool": r"learn_text_context='no' must be true or false",
    "weights_truncated": r"from '{w}/weights_truncated': adapter_model.safetensors is truncated or corrupt",
    "weights_text": r"from '{w}/weights_text': adapter_model.safetensors is truncated or corrupt",
    "weights_missing": r"adapter folder '{w}/weights_missing' holds no adapter_model.safetensors",
    "weights_pickle_only": r"'{w}/weights_pickle_only' holds adapter_model.bin, a pickle, and no adapter_model",
}
PREDICT = "predict {w}/a.png --output {w}/out/p.jsonl --adapter"
# (case, command line, what the one line says); {w} is the workspace, {ro} a folder this process cannot write in.
CASES = [(f"adapter_{name}", f"{PREDICT} {{w}}/{name}", message) for name, message in ADAPTER_MESSAGES.items()] + [
    ("evaluate_adapter_config_list", "evaluate --adapter {w}/config_list --output_dir {w}/out/e", "holds a list"),
    ("class_names_missing", f"{PREDICT} {{w}}/good --class_names_file {{w}}/nope.txt", r"--class_names_file .*nope"),
    ("class_names_empty", f"{PREDICT} {{w}}/good --class_names_file {{w}}/empty.txt", "empty.txt holds no class"),
    ("class_names_binary", f"{PREDICT} {{w}}/good --class_names_file {{w}}/binary.txt", "binary.txt is not UTF-8"),
    ("class_names_folder", f"{PREDICT} {{w}}/good --class_names_file {{w}}/out", r"out is a folder, not a file"),
    (
        "evaluate_class_names_empty",
        "evaluate --adapter {w}/good --class_names_file {w}/empty.txt --output_dir {w}/out/e",
        "no class",
    ),
    (
        "train_class_names_binary",
        "train --class_names_file {w}/binary.txt --output_dir {w}/t --epochs 1",
        "is not UTF-8 text",
    ),
    ("split_file_not_json", "train {coop} --split_file {w}/split_bad.json", r"split_bad.json \(--split_file\) cannot"),
    ("split_file_binary", "train {coop} --split_file {w}/binary.txt", r"binary.txt \(--split_file\) cannot be read"),
    ("split_file_list", "train {coop} --split_file {w}/split_list.json", "split_list.json is not a few-shot split"),
    ("data_root_missing", "train --dataset oxford_pets --data_root {w}/nope --output_dir {w}/t", "oxford_pets/ does"),
    ("imagefolder_without_images", "train --dataset {w}/no_images --output_dir {w}/t", "no_images holds no image"),
    ("train_settings_not_json", "train {w}/settings_bad.json", r"\(train's settings\) cannot be read: Expecting"),
    ("train_settings_bad_yaml", "train {w}/settings_bad.yaml", r"\(train's settings\) cannot be read"),
    ("train_settings_list", "train {w}/settings_list.json", r"settings_list.json \(train's settings\) holds a list"),
    (
        "train_settings_wrong_type",
        "train {w}/settings_type.json",
        r"settings_type.json: epochs is 'one' \(str\); give a",
    ),
    # Issue 31: values are values, checked against the field's type, never spliced into the command line as flags.
    (
        "train_settings_list_injects_flag",
        "train {w}/inject.json",
        r"inject.json: output_dir is \[.*\] \(list\); give a",
    ),
    ("train_settings_seed_list", "train {w}/seed_list.json", r"seed is \[1, '--overwrite_output_dir'\] \(list\)"),
    ("train_settings_epochs_list", "train {w}/epochs_list.json", r"epochs is \[2, 3\] \(list\); give a whole number"),
    ("train_settings_yaml_int_key", "train {w}/int_key.yaml", r"int_key.yaml: the key 1 is not a flag name"),
    ("train_settings_yaml_alias", "train {w}/alias.yaml", r"alias.yaml \(train's settings\) is refused: line 2 has a"),
    ("train_settings_other_suffix", "train {w}/settings.toml", r"settings.toml: train takes flags, or a settings file"),
    ("class_names_latin1", f"{PREDICT} {{w}}/good --class_names_file {{w}}/latin1.txt", r"\(byte 0xe9 on line 2\)"),
    (
        "class_names_control",
        f"{PREDICT} {{w}}/good --class_names_file {{w}}/bel.txt",
        r"line 2: the class name 'd\\x07",
    ),
    (
        "class_names_cr",
        f"{PREDICT} {{w}}/good --class_names_file {{w}}/cr.txt",
        r"'ca\\rt' holds the control character",
    ),
    (
        "imagefolder_not_utf8",
        "train --dataset {w}/not_utf8 --output_dir {w}/t",
        r"not_utf8/l\\xe9ft is not valid UTF-8",
    ),
    (
        "visualize_input_is_output",
        "visualize {w}/a.png --adapter {w}/good --output_dir {w} --overwrite_output_dir",
        r"a.png is one of this command's inputs, and an input is never written over, whatever the flags",
    ),
    ("train_settings_missing", "train {w}/nope.yaml", r"nope.yaml \(train's settings\) does not exist"),
    ("evaluate_output_dir_a_file", "evaluate --adapter {w}/good --output_dir {w}/a_file", "a_file is a file, not a"),
    ("train_output_dir_a_file", "train --output_dir {w}/a_file", "--output_dir .*a_file is a file, not a folder"),
    ("visualize_output_dir_a_file", "visualize {w}/a.png --adapter {w}/good --output_dir {w}/a_file", "is a file"),
    ("predict_output_a_folder", "predict {w}/a.png --adapter {w}/good --output {w}/out", "out exists and is not a"),
    ("predict_image_missing", "predict {w}/nope.png --adapter {w}/good --output {w}/out/p.jsonl", "nope.png does not"),
    ("train_read_only", "train --output_dir {ro}/run", "--output_dir .*run cannot be written"),
    ("evaluate_read_only", "evaluate --adapter {w}/good --output_dir {ro}/e", "--output_dir .*e cannot be written"),
    ("predict_read_only", "predict {w}/a.png --adapter {w}/good --output {ro}/p.jsonl", "--output .* cannot be"),
    ("visualize_read_only", "visualize {w}/a.png --adapter {w}/good --output_dir {ro}/v", "--output_dir .*v cannot"),
    ("benchmark_read_only", "benchmark --data_root {w} --datasets oxford_pets --output_dir {ro}/b", "cannot be writ"),
    ("ablation_read_only", "ablation --output_dir {ro}/a", r"--output_dir .*a cannot be written"),
    ("ablation_runs_read_only", "ablation --output_dir {ro}/a --docs_dir {w}/out", r"--output_dir .*a cannot be"),
]
COOP = "--dataset oxford_pets --data_root {w}/coop --shots 1 --epochs 1 --output_dir {w}/t"


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _edit_config(adapter: Path, **values: object) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, clip_path) -> Path:
    w = tmp_path_factory.mktemp("named_errors")
    torch.manual_seed(0)
    model = get_peft_model(CLIPModel.from_pretrained(clip_path), DPTConfig(class_names=CLASS_NAMES))
    for name in ["good", *ADAPTER_DAMAGE]:
        model.save_pretrained(w / name)
    for name, damage in ADAPTER_DAMAGE.items():
        damage(w / name)
    PILImage.new("RGB", (32, 32), "red").save(w / "a.png")
    (w / "a_file").write_text("x")
    (w / "out").mkdir()
    (w / "empty.txt").write_text("\n\n")
    (w / "binary.txt").write_bytes(b"\x8f\xff" + bytes(range(256)))
    (w / "split_bad.json").write_text('{"train": [')
    (w / "split_list.json").write_text("[1, 2, 3]")
    for name in ("cat", "dog"):
        (w / "no_images" / name).mkdir(parents=True)
    (w / "settings_bad.json").write_text('{"epochs": 1,')
    (w / "settings_bad.yaml").write_text("epochs: [1\n  shots: :")
    (w / "settings_list.json").write_text("[1]")
    (w / "settings_type.json").write_text('{"epochs": "one", "output_dir": "%s"}' % (w / "t"))
    (w / "inject.json").write_text(json.dumps({"output_dir": [str(w / "finished"), "--overwrite_output_dir"]}))
    (w / "seed_list.json").write_text(json.dumps({"seed": [1, "--overwrite_output_dir"], "output_dir": str(w / "t")}))
    (w / "epochs_list.json").write_text(json.dumps({"epochs": [2, 3]}))
    (w / "int_key.yaml").write_text("1: 2\n")
    (w / "alias.yaml").write_text("epochs: &e 2\nshots: *e\n")
    (w / "settings.toml").write_text("epochs = 2\n")
    (w / "latin1.txt").write_bytes(b"cat\nd\xe9g\n")
    (w / "bel.txt").write_bytes(b"cat\nd\x07og\n")
    (w / "cr.txt").write_bytes(b"ca\rt\ndog\n")
    for name in (b"right", b"l\xe9ft"):
        folder = os.path.join(os.fsencode(w / "not_utf8"), name)
        os.makedirs(folder)
        PILImage.new("RGB", (8, 8), "red").save(os.fsdecode(os.path.join(folder, b"a.png")))
    make_layout(w / "coop", "oxford_pets")
    return w


@pytest.fixture(scope="module")
def read_only(tmp_path_factory) -> Path:
    """A folder this process cannot create files in: a chmod 555 one, or (as root, which writes anywhere) sysfs."""
    folder = tmp_path_factory.mktemp("read_only")
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys/kernel")):
        try:
            fd, probe = tempfile.mkstemp(dir=candidate)
        except OSError:
            return candidate
        os.close(fd)
        os.unlink(probe)
    pytest.skip("no folder this process cannot write in (root without a read-only /sys)")


@pytest.fixture
def no_model_loads(monkeypatch):
    """A base model that loads fails the test: every refusal comes before the expensive work."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a base model loaded before the refusal: {args}")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", refuse)


@pytest.mark.parametrize(("case", "command", "message"), CASES, ids=[case for case, _, _ in CASES])
def test_each_unclear_case_is_one_named_line_exit_2_before_any_work(
    workspace, request, capsys, no_model_loads, case, command, message
):
    values = {"w": str(workspace), "coop": COOP.format(w=workspace)}
    if "{ro}" in command:
        values["ro"] = str(request.getfixturevalue("read_only"))
    argv = command.format(**values).split()
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    seconds = time.perf_counter() - started
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("dpt-peft: error: "), err
    pattern = message.format(w=re.escape(str(workspace)))
    assert re.search(pattern, err[-1]), (pattern, err[-1])
    assert not (workspace / "t" / "checkpoints").exists() and not (workspace / "out" / "p.jsonl").exists()
    assert seconds < 20, seconds  # no training, no model: the toy data at most


def test_a_settings_file_takes_flags_after_it_in_any_suffix_case(tmp_path):
    settings = tmp_path / "RUN.JSON"
    settings.write_text(json.dumps({"epochs": 2, "output-dir": str(tmp_path / "o"), "num_text_tokens": 4, "seed": 3}))
    args, config = parse_args([str(settings), "--epochs", "5", "--visual_depth", "2"])
    assert (args.epochs, args.seed, args.output_dir) == (5, 3, str(tmp_path / "o"))  # the flag wins over the file
    assert config["num_text_tokens"] == 4 and config["visual_depth"] == 2
    with pytest.raises(ValueError, match=r"settings.yaml: visual_lr is '1e-3' \(str\); give a number"):
        (tmp_path / "settings.yaml").write_text("visual_lr: '1e-3'\n")
        parse_args([str(tmp_path / "settings.yaml")])


@pytest.mark.parametrize("loader", ["load_adapted_model", "AutoDPTModel"])
@pytest.mark.parametrize("name", list(ADAPTER_MESSAGES))
def test_the_library_loaders_refuse_a_bad_adapter_by_name_before_the_base_model(
    workspace, no_model_loads, loader, name
):
    load = {"load_adapted_model": load_adapted_model, "AutoDPTModel": AutoDPTModel.from_pretrained}[loader]
    with pytest.raises(ValueError, match=ADAPTER_MESSAGES[name].format(w=re.escape(str(workspace)))):
        load(str(workspace / name))
