"""Issue 20: one write policy (manifests, atomic writes, refusals before work), the OS-level run lock, run identity
(locations, data fingerprints), damaged grid results, split-file checks, the up-scaled bomb guard, the verified
decoded-image cache and one-line CLI refusals. docs/reliability.md maps each guarantee to its test here."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from coop_layouts import PETS, make_layout
from datasets import Dataset, Image
from helpers import CLASS_NAMES
from peft import get_peft_model
from PIL import Image as PILImage
from transformers import CLIPModel

from dpt_peft import DPTConfig, predict
from dpt_peft.cli.commands import run_command
from dpt_peft.data import decoded_cache
from dpt_peft.data.coop_readers import load_coop_dataset
from dpt_peft.data.coop_splits import coop_few_shot_split, load_split_file, save_split_file
from dpt_peft.data.decoded_cache import DecodedImageCache
from dpt_peft.data.few_shot import data_fingerprint
from dpt_peft.data.images import open_rgb
from dpt_peft.experiments.grid import read_result
from dpt_peft.training.run_dir import check_output_dir, first_difference
from dpt_peft.training.run_layout import LOCK_FILE
from dpt_peft.training.run_lock import RunLock, check_lock
from dpt_peft.utils.errors import OutputRefused, UserInputError
from dpt_peft.utils.write_policy import MANIFEST_FILE, OutputFolder, check_writable_dir


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------- 1. one write policy


def test_a_file_is_created_or_replaced_only_when_dpt_peft_wrote_it(tmp_path):
    folder = OutputFolder(tmp_path / "out")
    folder.check(["results.md"])  # nothing there yet
    folder.write_text("results.md", "ours")
    folder.check(["results.md"])  # recorded with its hash: may be replaced
    folder.write_text("results.md", "ours, again")
    assert (tmp_path / "out" / "results.md").read_text() == "ours, again"
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp" in p.name]  # atomic: no temporary left

    (tmp_path / "out" / "results.md").write_text("edited by the user")  # its hash no longer matches: not ours
    (tmp_path / "out" / "results.csv").write_text("the user's")
    for name in ("results.md", "results.csv"):
        with pytest.raises(OutputRefused, match=rf"out/{name} exists and dpt_peft did not write it.*--overwrite_x"):
            folder.check([name], overwrite_flag="--overwrite_x")
    folder.check(["results.csv"], overwrite_flag="--overwrite_x", overwrite=True)  # the flag allows it


def test_overwrite_removes_only_files_a_manifest_records(tmp_path):
    out = tmp_path / "out"
    folder = OutputFolder(out)
    folder.write_json("metrics.json", {"accuracy": 1})
    OutputFolder(out / "eval").write_json("eval_metrics.json", {})  # a nested folder's own manifest
    (out / "history.json").write_text("another tool's")  # a name dpt_peft also writes, not recorded
    assert folder.unowned() == ["history.json"]
    assert sorted(folder.remove_owned()) == ["eval/eval_metrics.json", "metrics.json"]
    assert snapshot(out) == {"history.json": hashlib.sha256(b"another tool's").hexdigest()}


def test_overwrite_output_dir_never_deletes_another_tools_files_named_like_ours(tmp_path):
    """The issue's case: metrics.json, history.json, checkpoints/epoch_3/..., splits/*.json, */eval_metrics.json,
    no run.json: refused also with --overwrite_output_dir, nothing deleted."""
    out = tmp_path / "other_tool"
    for name in (
        "metrics.json",
        "history.json",
        "checkpoints/epoch_3/optimizer.json",
        "splits/a.json",
        "x/eval_metrics.json",
    ):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("{}")
    before = snapshot(out)
    with pytest.raises(
        OutputRefused, match=r"holds no dpt_peft run: 'checkpoints/epoch_3/optimizer.json' \(and 4 more\)"
    ):
        check_output_dir(out, {}, resume=False, overwrite=True)
    assert snapshot(out) == before


def test_an_output_folder_that_cannot_be_written_fails_before_any_work(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputRefused, match="--output_dir .*a_file is a file, not a folder"):
        check_writable_dir(tmp_path / "a_file", "--output_dir")
    with pytest.raises(OutputRefused, match="is a file, so the folder cannot be made"):
        check_writable_dir(tmp_path / "a_file" / "eval", "--output_dir")
    if os.geteuid() != 0:  # root writes anywhere
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o555)
        with pytest.raises(OutputRefused, match="cannot be written"):
            check_writable_dir(read_only / "run", "--output_dir")


# ------------------------------------------------------------------------------- 2. identity, lock, grids


def test_resume_compares_runs_wherever_the_folder_is():
    identity = {"output_dir": "./run", "epochs": 6, "data_fingerprint": "a"}
    assert first_difference({**identity, "output_dir": "/abs/run"}, identity) is None
    assert first_difference({**identity, "output_dir": "/moved/elsewhere"}, identity) is None
    assert first_difference({**identity, "epochs": 1}, identity) == "epochs: 1 -> 6"
    assert "training images changed" in first_difference({**identity, "data_fingerprint": "b"}, identity)


def test_a_refused_run_names_only_the_differing_keys_of_its_config():
    """Issue 32 item 12: two 22-key config dicts hid the one difference that mattered."""
    config = {f"field_{i}": i for i in range(22)}
    old = {"model_name_or_path": None, "config": {**config, "num_visual_tokens": 10}}
    new = {"model_name_or_path": "dpt-peft/toy-siglip", "config": {**config, "num_visual_tokens": 2}}
    assert first_difference(old, new) == (
        "config.num_visual_tokens: 10 -> 2; model_name_or_path: None -> 'dpt-peft/toy-siglip'"
    )
    many = {"config": {f"field_{i}": -i - 1 for i in range(22)}}
    assert first_difference({"config": config}, many).endswith("; and 17 more")


def _folder_dataset(root: Path) -> Dataset:
    paths = sorted(str(p) for p in root.rglob("*.png"))
    return Dataset.from_dict({"image": [{"path": p, "bytes": None} for p in paths]}).cast_column(
        "image", Image(decode=False)
    )


class _Task:
    def __init__(self, train: Dataset):
        self.train = train


def test_the_data_fingerprint_sees_swapped_class_folders_but_not_a_moved_root(tmp_path):
    root = tmp_path / "data"
    for name, colour in (("cat", "red"), ("dog", "blue")):
        (root / name).mkdir(parents=True)
        PILImage.new("RGB", (8, 8), colour).save(root / name / "1.png")
    first = data_fingerprint({"t": _Task(_folder_dataset(root))}, "image")
    assert data_fingerprint({"t": _Task(_folder_dataset(root))}, "image") == first
    moved = tmp_path / "moved"
    shutil.copytree(root, moved, copy_function=shutil.copy2)  # same names, sizes and mtimes
    assert data_fingerprint({"t": _Task(_folder_dataset(moved))}, "image") == first
    os.rename(root / "cat", root / "tmp")  # the classes' folders swapped between kill and resume
    os.rename(root / "dog", root / "cat")
    os.rename(root / "tmp", root / "dog")
    PILImage.new("RGB", (8, 8), "green").save(root / "dog" / "1.png")
    assert data_fingerprint({"t": _Task(_folder_dataset(root))}, "image") != first


HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dpt_peft.training.run_lock import RunLock
    lock = RunLock.acquire(Path(sys.argv[1]))
    print("held", flush=True)
    time.sleep(60)
    """
)


def test_the_lock_is_os_level_one_holder_and_dies_with_its_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserInputError, match=rf"Another dpt_peft run.*locked by process {holder.pid}"):
            check_lock(tmp_path / LOCK_FILE)
        with pytest.raises(UserInputError, match="Another dpt_peft run"):
            RunLock.acquire(tmp_path)
    finally:
        holder.kill()  # kill -9: no clean-up ran
        holder.wait()
    lock = RunLock.acquire(tmp_path)  # the kernel released it; no stale takeover needed
    lock.release()


RACE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dpt_peft.training.run_lock import RunLock
    root, trials = Path(sys.argv[1]), int(sys.argv[2])
    print("ready", flush=True)
    for trial in range(trials):
        go = root / f"go{trial}"
        while not go.exists():
            time.sleep(0.001)
        try:
            lock = RunLock.acquire(root / str(trial))
        except ValueError:
            print("refused", flush=True)
        else:
            print("held", flush=True)
            time.sleep(1.0)
            lock.release()
    """
)


def test_two_runs_never_both_hold_the_lock(tmp_path):
    """Three processes race for the same folder's lock, three times (each process imports dpt_peft once)."""
    trials = 3
    racers = [
        subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), str(trials)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    assert all(p.stdout.readline().strip() == "ready" for p in racers)  # imported, waiting
    for trial in range(trials):
        (tmp_path / str(trial)).mkdir()
        (tmp_path / f"go{trial}").touch()  # all at once
        outcomes = sorted(p.stdout.readline().strip() for p in racers)
        assert outcomes == ["held", "refused", "refused"]
    for racer in racers:
        assert racer.wait(timeout=120) == 0


def test_a_damaged_result_of_ours_is_named_and_redone_and_a_foreign_one_refused(tmp_path, caplog):
    folder = OutputFolder(tmp_path)
    folder.write_json("result.json", {"accuracy": 0.5})
    assert read_result(tmp_path / "result.json") == {"accuracy": 0.5}
    (tmp_path / "result.json").write_text('{"accur')  # truncated, as a full disk leaves it
    folder.write_json("metrics.json", {})
    (tmp_path / "metrics.json").write_bytes(b"")  # 0 bytes
    with caplog.at_level(logging.WARNING):
        assert read_result(tmp_path / "result.json") is None
        assert read_result(tmp_path / "metrics.json") is None
    assert f"{tmp_path / 'result.json'} cannot be read" in caplog.text and "redoing the run" in caplog.text
    assert not (tmp_path / "result.json").exists() and not (tmp_path / "metrics.json").exists()
    (tmp_path / "notes.json").write_text("[1, 2")
    with pytest.raises(OutputRefused, match=r"notes.json cannot be read.*dpt_peft did not write it"):
        read_result(tmp_path / "notes.json")
    assert (tmp_path / "notes.json").exists()


# ------------------------------------------------------------------------------- 3. split files


@pytest.fixture
def pets_split(tmp_path):
    make_layout(tmp_path, "oxford_pets", counts={"train": 10, "val": 6, "test": 2}, classes=PETS)
    pets = load_coop_dataset("oxford_pets", tmp_path)
    path = tmp_path / "split.json"
    save_split_file(path, pets, coop_few_shot_split(pets, shots=2, seed=0), shots=2, seed=0)
    return pets, path


def _edit(path: Path, change) -> None:
    content = json.loads(path.read_text())
    change(content["splits"])
    path.write_text(json.dumps(content))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["train"].clear(), r"the 'train' list is empty"),
        (lambda s: s["train"].extend([s["train"][0]] * 50), r"is listed twice"),
        (lambda s: s.update(train=[r for r in s["train"] if r[1] != 0]), r"class 0 has 0 training images.*--shots 2"),
        (lambda s: s["train"].__setitem__(0, ["../../etc/passwd", 0]), r"not a path inside the dataset folder"),
        (lambda s: s["train"].__setitem__(0, ["/etc/passwd", 0]), r"not a path inside the dataset folder"),
    ],
)
def test_a_bad_split_file_is_refused_naming_the_problem(pets_split, change, message):
    pets, path = pets_split
    assert len(load_split_file(path, pets, shots=2)["train"]) == 2 * len(PETS)
    _edit(path, change)
    with pytest.raises(ValueError, match=message):
        load_split_file(path, pets, shots=2)


def test_a_split_file_of_other_shots_is_refused(pets_split):
    pets, path = pets_split
    with pytest.raises(ValueError, match=r"class 0 has 2 training images in the file, not --shots 4"):
        load_split_file(path, pets, shots=4)


# ------------------------------------------------------------------------------- 5. bounded inputs


def one_million_by_one_png() -> bytes:
    buffer = io.BytesIO()
    PILImage.new("L", (1_000_000, 1)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_bomb_guard_counts_the_up_scaled_size():
    data = one_million_by_one_png()
    assert len(data) < 3000
    with pytest.raises(PILImage.DecompressionBombError, match="1000000x1 pixels would be .* once resized"):
        open_rgb(data)
    assert open_rgb(PILImage.new("RGB", (4000, 3000))).size == (4000, 3000)  # a large photo is fine


def test_predict_skips_a_bomb_and_keeps_the_good_images(tmp_path, clip_path):
    torch.manual_seed(0)
    model = get_peft_model(CLIPModel.from_pretrained(clip_path), DPTConfig(class_names=CLASS_NAMES)).eval()
    good, bomb = tmp_path / "good.png", tmp_path / "bomb.png"
    PILImage.new("RGB", (32, 32), "red").save(good)
    bomb.write_bytes(one_million_by_one_png())
    results = predict(model, [good, bomb])
    assert [r.source for r in results] == [str(good)]


# ------------------------------------------------------------------------------- 6. the decoded cache


def _images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i}.png"
        PILImage.fromarray(np.random.default_rng(i).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _dataset(paths: list[str]) -> Dataset:
    return Dataset.from_dict({"image": paths, "label": [0] * len(paths)}).cast_column("image", Image(decode=False))


def test_a_zeroed_cache_entry_is_detected_and_decoded_again(tmp_path, caplog):
    dataset = _dataset(_images(tmp_path / "images", 3))
    first = DecodedImageCache.build(dataset, "image", 16, cache_dir=tmp_path / "cache")
    entry = sorted((tmp_path / "cache").rglob("*.u8"))[0]
    entry.write_bytes(bytes(entry.stat().st_size))  # zeroed, same size
    with caplog.at_level(logging.WARNING):
        second = DecodedImageCache.build(dataset, "image", 16, cache_dir=tmp_path / "cache")
    assert "is damaged (checksum)" in caplog.text
    assert (second.decoded, second.reused) == (1, 2) and torch.equal(second.pixels, first.pixels)


def test_an_unreadable_entry_is_retried_when_the_decoder_settings_change(tmp_path, monkeypatch):
    paths = _images(tmp_path / "images", 2)
    Path(paths[1]).write_bytes(b"not an image")
    dataset = _dataset(paths)
    assert DecodedImageCache.build(dataset, "image", 16, cache_dir=tmp_path / "cache").skipped == [paths[1]]
    assert len(list((tmp_path / "cache").rglob("*.bad"))) == 1
    monkeypatch.setattr(decoded_cache, "DECODER_VERSION", 99)  # a new decoder: the note does not apply
    PILImage.new("RGB", (8, 8)).save(paths[1], format="PNG")
    again = DecodedImageCache.build(dataset, "image", 16, cache_dir=tmp_path / "cache")
    assert again.skipped == [] and len(again) == 2


def test_a_file_replaced_between_hashing_and_decoding_is_stored_under_what_was_decoded(tmp_path, monkeypatch):
    paths = _images(tmp_path / "images", 1)
    old_key = hashlib.sha256(Path(paths[0]).read_bytes()).hexdigest()
    real = decoded_cache._content_key

    def hash_then_replace(value):
        key = real(value)
        PILImage.new("RGB", (30, 40), "blue").save(paths[0], format="PNG")  # replaced right after hashing
        return key

    monkeypatch.setattr(decoded_cache, "_content_key", hash_then_replace)
    DecodedImageCache.build(_dataset(paths), "image", 16, cache_dir=tmp_path / "cache")
    stored = [p.stem for p in (tmp_path / "cache").rglob("*.u8")]
    assert stored == [hashlib.sha256(Path(paths[0]).read_bytes()).hexdigest()] and old_key not in stored


# ------------------------------------------------------------------------------- 7. one-line refusals


def test_a_refusal_is_one_line_and_exit_status_2(capsys):
    def refuse(argv):
        raise OutputRefused(f"--output_dir {argv[0]} is a file,\n   not a folder; choose another --output_dir.")

    with pytest.raises(SystemExit) as exit_info:
        run_command(refuse, ["x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "dpt-peft: error: --output_dir x is a file, not a folder; choose another --output_dir.\n"
    with pytest.raises(SystemExit):
        run_command(refuse, ["x"], verbose=True)
    assert "Traceback" in capsys.readouterr().err
    with pytest.raises(KeyError):  # a bug is not a refusal: its traceback stays
        run_command(lambda argv: {}["missing"], [])
    with pytest.raises(ValueError):  # also a bare ValueError or TimeoutError: only the project's refusals are lines
        run_command(lambda argv: int("x"), [])
    assert run_command(lambda argv: len(argv), ["a", "b"]) == 2
    assert MANIFEST_FILE.startswith(".")


def test_an_empty_class_folder_is_named_in_a_warning(tmp_path, caplog):
    from dpt_peft.data.datasets import load_image_dataset

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(2):
            PILImage.new("RGB", (8, 8), "red").save(tmp_path / name / f"{i}.png")
    (tmp_path / "bird").mkdir()  # no images: imagefolder leaves the class out
    with caplog.at_level(logging.WARNING):
        dataset = load_image_dataset(str(tmp_path))
    assert dataset["train"].features["label"].names == ["cat", "dog"]
    assert f"the class folder {tmp_path / 'bird'} holds no images" in caplog.text


def test_evaluate_refuses_an_output_dir_that_is_a_file_before_any_work(tmp_path):
    from dpt_peft.training.evaluation import EvaluationSpec, evaluate_adapter

    spec = EvaluationSpec(adapter=str(tmp_path / "no_adapter"), split=None, class_names=[])
    (tmp_path / "report").write_text("x")
    with pytest.raises(OutputRefused, match="report is a file, not a folder"):  # before the (missing) adapter loads
        evaluate_adapter(spec, str(tmp_path / "report"))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval_metrics.json").write_text("the user's")
    with pytest.raises(
        OutputRefused, match="eval_metrics.json exists and dpt_peft did not write it.*--overwrite_output_dir"
    ):
        evaluate_adapter(spec, str(tmp_path / "eval"))


def test_reports_never_replace_a_users_files(tmp_path):
    from dpt_peft.experiments import ablation, benchmark_report

    (tmp_path / "few_shot").mkdir()
    (tmp_path / "few_shot" / "results.md").write_text("# my notes")
    with pytest.raises(OutputRefused, match="few_shot/results.md exists and dpt_peft did not.*--overwrite_rep"):
        benchmark_report.check_report_target("few_shot", str(tmp_path))
    benchmark_report.check_report_target("few_shot", str(tmp_path), overwrite=True)  # --overwrite_reports: asked
    row = dict.fromkeys(benchmark_report.COLUMNS, 0) | {"protocol": "few_shot", "dataset": "toy", "method": "dpt"}
    metrics = [row | {"shots": 1, "metric": metric, "mean": 0.5} for metric in benchmark_report.METRICS["few_shot"]]
    benchmark_report.write_report("few_shot", metrics, str(tmp_path))
    assert "my notes" not in (tmp_path / "few_shot" / "results.md").read_text()
    benchmark_report.check_report_target("few_shot", str(tmp_path))  # ours now: may be replaced unasked
    markdown, figure = ablation.report_paths(str(tmp_path / "ablation"))  # not ./docs unless asked
    assert markdown == str(tmp_path / "ablation" / "results.md")
    ablation.check_report_target(markdown, figure)
    ablation.write_report({"coop": [0.5, 0.7], "zero_shot": [0.4, 0.4]}, markdown, figure, "test")
    ablation.check_report_target(markdown, figure)  # ours now: may be replaced
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.json").write_text("{}")
    with pytest.raises(OutputRefused, match="docs/results.json exists"):
        ablation.check_report_target(*ablation.report_paths(str(tmp_path / "ablation"), str(tmp_path / "docs")))


def test_a_grid_reuses_a_run_only_with_its_identity_and_redoes_a_damaged_result(tmp_path, monkeypatch):
    from dpt_peft.experiments import grid
    from dpt_peft.experiments.grid import GridRun, run_grid

    fields = {"output_dir": str(tmp_path / "run"), "epochs": 1, "shots": 2, "report_to": "none"}
    first = GridRun.make("run", fields, {"eval_batch_size": 300}, {})
    [metrics] = run_grid([first])

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    with monkeypatch.context() as patch:
        patch.setattr(grid, "train", no_training)
        assert run_grid([first]) == [metrics]  # the same identity: read back
        other = GridRun.make("run", fields, {"eval_batch_size": 300, "epochs": 2}, {})
        with pytest.raises(OutputRefused, match=r"run was finished with other settings \(epochs: 1 -> 2\)"):
            run_grid([other])
    (tmp_path / "run" / "metrics.json").write_bytes(b"")  # what a full disk leaves
    [again] = run_grid([first])  # named, removed, redone from the run's checkpoint
    assert again["accuracy"] == pytest.approx(metrics["accuracy"])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["accuracy"] == again["accuracy"]


def test_a_bomb_in_a_test_set_is_skipped_and_counted(tmp_path):
    from transformers import AutoImageProcessor

    from dpt_peft.data.batching import ImageBatcher
    from dpt_peft.sources import TOY_CLIP_ID, resolve

    good, bomb = tmp_path / "good.png", tmp_path / "bomb.png"
    PILImage.new("RGB", (32, 32), "red").save(good)
    bomb.write_bytes(one_million_by_one_png())
    batcher = ImageBatcher(AutoImageProcessor.from_pretrained(resolve(TOY_CLIP_ID)), "image", "label")
    batch = batcher([{"image": {"path": str(p), "bytes": None}, "label": 0} for p in (good, bomb)])
    assert batch["pixel_values"].shape[0] == 1 and batcher.skipped == [str(bomb)]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_a_plain_open_gives_under_the_umask(tmp_path, umask, mode):
    """A team sharing a run folder reads its metrics and adapter: mkstemp's 0600 is not what the user's umask says."""
    previous = os.umask(umask)
    try:
        written = OutputFolder(tmp_path).write_text("metrics.json", "{}")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(previous)
    assert written.stat().st_mode & 0o777 == mode == (tmp_path / "plain.txt").stat().st_mode & 0o777
