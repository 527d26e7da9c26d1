"""The Hub paths run for real; only the network calls are replaced by a local stand-in for the Hub."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import peft.config
import peft.utils.save_and_load
import pytest
import torch
from helpers import CLASS_NAMES
from huggingface_hub import HfApi
from peft import PeftModel, get_peft_model
from transformers import CLIPModel

from dpt_peft import DPTConfig

REPO_ID = "someone/dpt-tiny-clip"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A directory per repo id that stands in for the Hub's storage, behind the download functions PEFT calls."""
    storage = tmp_path / "hub"
    requested = []

    def hf_hub_download(repo_id, filename, subfolder=None, **kwargs):
        requested.append((repo_id, filename))
        path = storage / repo_id / (subfolder or "") / filename
        if not path.exists():
            raise FileNotFoundError(f"{repo_id} has no {filename}")
        return str(path)

    def file_exists(repo_id, filename, **kwargs):
        return (storage / repo_id / filename).exists()

    monkeypatch.setattr(peft.config, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(peft.utils.save_and_load, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(peft.utils.save_and_load, "file_exists", file_exists)
    return SimpleNamespace(storage=storage, requested=requested)


def test_load_adapter_from_a_hub_repo_id(clip_path, pixel_values, tmp_path, fake_hub):
    model = get_peft_model(CLIPModel.from_pretrained(clip_path), DPTConfig(class_names=CLASS_NAMES)).eval()
    model.save_pretrained(tmp_path / "local")
    shutil.copytree(tmp_path / "local", fake_hub.storage / REPO_ID)

    loaded = PeftModel.from_pretrained(CLIPModel.from_pretrained(clip_path), REPO_ID).eval()
    assert (REPO_ID, "adapter_model.safetensors") in fake_hub.requested
    assert (REPO_ID, "adapter_config.json") in fake_hub.requested
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixel_values).logits, loaded(pixel_values=pixel_values).logits)


def test_push_to_hub_uploads_adapter_and_model_card(clip_path, monkeypatch):
    uploads = {}

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        for operation in operations:
            with open(operation.path_or_fileobj, "rb") as f:
                uploads[operation.path_in_repo] = f.read()
        return SimpleNamespace(commit_url=f"https://hub/{repo_id}/commit/1", oid="1")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    model = get_peft_model(CLIPModel.from_pretrained(clip_path), DPTConfig(class_names=CLASS_NAMES, num_text_tokens=4))
    model.add_adapter("birds", DPTConfig.for_method("coop", class_names=["bird", "fish"]))
    model.push_to_hub(REPO_ID)

    assert set(uploads) == {
        "adapter_model.safetensors",
        "adapter_config.json",
        "README.md",
        "birds/adapter_model.safetensors",
        "birds/adapter_config.json",
    }
    config = json.loads(uploads["adapter_config.json"])
    assert config["peft_type"] == "DPT" and config["class_names"] == CLASS_NAMES
    card = uploads["README.md"].decode()
    assert "Dual-modality Prompt Tuning" in card and "arxiv.org/abs/2208.08340" in card
    assert "**Base model:** a local CLIP (its Hub id was not given: pass `--base_model_id`" in card
    assert "- **default** (5): cat, dog, red car, sea_turtle, tree" in card
    assert "class-aware visual prompts (CAVPT)" in card
    assert '"num_text_tokens": 4' in card
    assert "library_name: peft" in card and "dpt" in card
    assert "## Adapter `birds`" in card and "- **default** (2): bird, fish" in card
    assert "More Information Needed" not in card and "license: apache-2.0" in card


def test_a_trained_adapters_card_states_data_metrics_and_base_model(tmp_path):
    from huggingface_hub import ModelCard

    from dpt_peft.cli import train_main

    metrics = train_main(
        [
            "--epochs",
            "1",
            "--shots",
            "2",
            "--report_to",
            "none",
            "--output_dir",
            str(tmp_path),
            "--base_model_id",
            "someone/toy-clip",
        ]
    )
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert "More Information Needed" not in card.content
    assert card.data.base_model == "someone/toy-clip" and card.data.license == "apache-2.0"
    result = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert result["accuracy"] == pytest.approx(metrics["accuracy"])
    assert card.data.eval_results[0].dataset_name == "toy-position"
    assert "`toy-position`, 2 images per class" in card.text and "| top-1 accuracy |" in card.text
    assert 'AutoDPTModel.from_pretrained("<this repo or folder>")' in card.text
