"""What `python -m dpt_peft.toy.pretrain` reproduces (issue 32, item 18): the same seed, torch version, thread count
and CPU give the same weights bit for bit; the module's docstring and the README say what differs elsewhere."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from dpt_peft.toy import pretrain

REPO = Path(__file__).resolve().parents[2]


def test_the_same_seed_threads_and_torch_give_the_same_weights_bit_for_bit(tmp_path):
    first = load_file(pretrain.pretrain(tmp_path / "a", steps=3, batch_size=16, seed=0) / "model.safetensors")
    second = load_file(pretrain.pretrain(tmp_path / "b", steps=3, batch_size=16, seed=0) / "model.safetensors")
    assert first.keys() == second.keys() and len(first) == 126
    assert all(torch.equal(first[key], second[key]) for key in first)
    other_seed = load_file(pretrain.pretrain(tmp_path / "c", steps=3, batch_size=16, seed=1) / "model.safetensors")
    assert not all(torch.equal(first[key], other_seed[key]) for key in first)


def test_the_documentation_says_what_is_reproducible_and_what_is_not():
    text = " ".join(pretrain.__doc__.split())
    assert "same seed, torch version, thread count" in text and "bit for bit" in text
    assert "rebuild elsewhere gives other weights" in text
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "rebuilds it deterministically" not in readme
    assert "same torch version and thread count" in readme
