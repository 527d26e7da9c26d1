"""Fixtures shared by the tests; the tiny CLIPs they use come from `helpers.py`."""

from __future__ import annotations

import pytest
import torch
from helpers import save_tiny_clip
from siglip_helpers import save_tiny_siglip
from transformers import CLIPModel

import dpt_peft  # noqa: F401  (registers DPT with PEFT)


@pytest.fixture(scope="session")
def clip_path(tmp_path_factory) -> str:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_siglip_path(tmp_path_factory) -> str:
    return save_tiny_siglip(tmp_path_factory.mktemp("tiny_siglip"))


@pytest.fixture(params=["clip", "siglip"])
def base_path(request, clip_path, tiny_siglip_path) -> str:
    """A tiny CLIP, then a tiny SigLIP: a test of what every family must do runs on both."""
    return clip_path if request.param == "clip" else tiny_siglip_path


@pytest.fixture
def clip(clip_path) -> CLIPModel:
    return CLIPModel.from_pretrained(clip_path).eval()


@pytest.fixture
def pixel_values() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def labels() -> torch.Tensor:
    return torch.tensor([0, 1, 2, 3])


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one state per process; a run with other precision or launcher settings needs it reset (as a
    new process would have it)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
