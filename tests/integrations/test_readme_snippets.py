"""Every ```python block of README.md and docs/*.md runs as written.

Each block runs alone in a fresh Python process, offline, in one working folder. What a reader has and the test
cannot download is stood in for, never edited into the block: the Hub ids the blocks name resolve to tiny models of
the same classes in a local Hub cache (`HF_HUB_OFFLINE=1`), `push_to_hub` uploads into a local folder, and the files
a block reads are made first (an `imagefolder` at `path/to/images`, the adapter `python examples/train.py` writes to
`outputs/dpt-toy/adapter`). A block that needs the real Hub or a GPU says so in a line `# readme-test: skip (why)`,
the only way to skip one. Slow (a process per block, about 5 s each): CI runs it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import save_tiny_clip
from PIL import Image
from siglip_helpers import save_tiny_siglip

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SKIP_MARKER = "# readme-test: skip"
# The Hub models the blocks name, each stood in for by a tiny model of its class (saved by `helpers`).
HUB_MODELS = {"openai/clip-vit-base-patch16": save_tiny_clip, "google/siglip-base-patch16-224": save_tiny_siglip}
# Run before each block: push_to_hub's two Hub calls write into hub_uploads/<repo id>/ instead.
FAKE_PUSH = """
import runpy, shutil, sys
from pathlib import Path
from types import SimpleNamespace
from huggingface_hub import HfApi

def create_repo(self, repo_id, **kwargs):
    return SimpleNamespace(repo_id=repo_id)

def create_commit(self, repo_id, operations, **kwargs):
    for operation in operations:
        target = Path("hub_uploads", repo_id, operation.path_in_repo)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(operation.path_or_fileobj, target)
    return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", oid="0")

HfApi.create_repo, HfApi.create_commit = create_repo, create_commit
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def python_blocks() -> list[tuple[str, str]]:
    """(document:line, code) of every ```python block, in document order."""
    blocks = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
            line = text[: match.start()].count("\n") + 1
            blocks.append((f"{document.relative_to(REPO)}:{line}", match.group(1)))
    return blocks


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The working folder (with the files the blocks read) and the environment of a reader who has the Hub models."""
    root = tmp_path_factory.mktemp("readme")
    cache = root / "hub_cache"
    for repo_id, save in HUB_MODELS.items():
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        commit = "0" * 40
        save(repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    work = root / "work"
    for split, count in (("train", 4), ("test", 2)):
        for label, colour in (("cat", "orange"), ("dog", "gray")):
            folder = work / "path" / "to" / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (40, 40), colour).rotate(20 * i).save(folder / f"{i}.png")
    _save_toy_adapter(work / "outputs" / "dpt-toy" / "adapter")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return work, env


def _save_toy_adapter(folder: Path) -> None:
    """What `python examples/train.py` leaves in outputs/dpt-toy/adapter (untrained here: the blocks only load it)."""
    from peft import get_peft_model

    from dpt_peft import DPTConfig
    from dpt_peft.sources import load_base_model
    from dpt_peft.toy.tasks import toy_dataset

    names = toy_dataset("position")["test"].features["label"].names
    get_peft_model(load_base_model(), DPTConfig(class_names=names, num_text_tokens=4)).save_pretrained(folder)


def run_python(code: str, workspace: tuple[Path, dict[str, str]], name: str) -> subprocess.CompletedProcess:
    work, env = workspace
    script = work.parent / f"{re.sub(r'[^A-Za-z0-9]', '_', name)}.py"
    script.write_text(code, encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-c", FAKE_PUSH, str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_documents_have_python_blocks():
    assert len(python_blocks()) >= 6


@pytest.mark.slow
@pytest.mark.parametrize(("name", "code"), python_blocks(), ids=[name for name, _ in python_blocks()])
def test_every_python_block_runs_as_written(name, code, workspace):
    """Issue 32, item 9: README snippets that failed as written (undefined inputs, `dpt_peft.metrics` not imported,
    the toy CLIP's 16-position context) can no longer rot."""
    if SKIP_MARKER in code:
        pytest.skip(code.split(SKIP_MARKER, 1)[1].splitlines()[0].strip())
    result = run_python(code, workspace, name)
    assert result.returncode == 0, f"{name} failed:\n{result.stderr[-4000:]}"
    if "push_to_hub(" in code:
        work, _ = workspace
        assert any((work / "hub_uploads").rglob("adapter_model.safetensors"))


@pytest.mark.slow
def test_without_import_dpt_peft_peft_fails_as_the_readme_says(workspace):
    """Issue 32, item 8: the README quotes the error a fresh process gets from PEFT without `import dpt_peft` (so a
    search for it finds the note), and AutoDPTModel, which imports dpt_peft itself, loads the same adapter."""
    readme = (REPO / "README.md").read_text()
    assert "`KeyError: 'DPT'`" in readme
    bare = (
        "from peft import PeftModel\nfrom transformers import CLIPModel\n"
        'clip = CLIPModel.from_pretrained("openai/clip-vit-base-patch16")\n'
        'PeftModel.from_pretrained(clip, "outputs/dpt-toy/adapter")\n'
    )
    failed = run_python(bare, workspace, "without_import")
    assert failed.returncode != 0 and failed.stderr.strip().splitlines()[-1] == "KeyError: 'DPT'"
    auto = 'from dpt_peft import AutoDPTModel\nAutoDPTModel.from_pretrained("outputs/dpt-toy/adapter")\n'
    assert run_python(auto, workspace, "auto").returncode == 0


def test_no_block_is_skipped_without_a_reason():
    for name, code in python_blocks():
        if SKIP_MARKER in code:
            assert code.split(SKIP_MARKER, 1)[1].strip().startswith("("), name


def test_the_readme_says_how_its_times_were_measured_and_what_to_set_on_a_busy_machine():
    """Issue 32, item 19: torch's default threads on a shared 2-core machine made the default run about 10x slower."""
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "measured on an otherwise idle machine with torch's default threads" in readme
    assert "OMP_NUM_THREADS=1 python examples/train.py" in readme
