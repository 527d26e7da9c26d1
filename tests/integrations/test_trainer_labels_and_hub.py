"""A plain `transformers.Trainer` on a user's dataset (what the model sets for it, and what it cannot), `push_to_hub`
with transformers' keyword arguments, and the run identity of a `datasets` object given to the training function."""

from __future__ import annotations

import pickle
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from huggingface_hub import HfApi, ModelCard
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from dpt_peft import DPTConfig, DPTImageCollator
from dpt_peft.data.few_shot import data_fingerprint
from dpt_peft.sources import load_base_model, load_image_processor
from dpt_peft.toy.tasks import toy_dataset
from dpt_peft.training.arguments import TrainArguments
from dpt_peft.training.trainer import train


@pytest.fixture(scope="module")
def pixels_and_labels():
    """A user's preprocessed dataset: 12 toy test images as `pixel_values` and `labels`, and the class names."""
    processor = load_image_processor()
    test = toy_dataset("position")["test"].select(range(0, 600, 50))
    batch = DPTImageCollator(processor)(list(test))
    dataset = Dataset.from_dict({"pixel_values": batch["pixel_values"].numpy(), "labels": batch["labels"].numpy()})
    return dataset.with_format("torch"), batch, test.features["label"].names


def test_a_plain_trainer_evaluates_with_compute_metrics_and_the_users_config_is_untouched(pixels_and_labels, tmp_path):
    dataset, batch, names = pixels_and_labels
    clip = load_base_model()
    before = clip.config.to_dict()
    model = get_peft_model(clip, DPTConfig(class_names=names, num_text_tokens=4))
    assert clip.config.to_dict() == before  # nothing DPT-specific is written into the user's config
    seen = []

    def compute_metrics(prediction) -> dict:
        logits = prediction.predictions[0]  # a plain Trainer gathers every output (all batch-first), logits first
        seen.append(logits.shape)
        return {"accuracy": float((np.argmax(logits, -1) == prediction.label_ids).mean())}

    args = TrainingArguments(
        str(tmp_path), per_device_eval_batch_size=5, report_to=[], use_cpu=True, label_names=["labels"]
    )
    metrics = Trainer(model=model, args=args, eval_dataset=dataset, compute_metrics=compute_metrics).evaluate()
    with torch.no_grad():
        output = model(**batch)
    assert seen == [(12, len(names))]
    assert metrics["eval_loss"] == pytest.approx(float(output.loss), rel=1e-4)
    assert metrics["eval_accuracy"] == pytest.approx(
        float((output.logits.argmax(-1) == batch["labels"]).float().mean())
    )

    assert model.config is clip.config and not hasattr(model.config, "keys_to_ignore_at_inference")  # no view
    assert isinstance(model.config, type(clip.config)) and model.config.to_dict() == clip.config.to_dict()
    pickled = pickle.loads(pickle.dumps(model.config))  # as the user's own config class
    assert type(pickled) is type(clip.config) and pickled.to_dict() == clip.config.to_dict()
    assert "keys_to_ignore_at_inference" not in clip.config.to_dict()  # nor after Trainer read it
    model.config.logit_scale_init_value = 3.0  # a setting made through the PEFT model is the user's config's
    assert clip.config.logit_scale_init_value == 3.0


def test_a_plain_trainer_without_label_names_says_how_to_fix_it(pixels_and_labels, tmp_path):
    dataset, _, names = pixels_and_labels
    model = get_peft_model(load_base_model(), DPTConfig(class_names=names, num_text_tokens=4))
    args = TrainingArguments(
        str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[], use_cpu=True, save_strategy="no"
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    # transformers finds labels in the forward of get_base_model()'s class (CLIPModel), not in the PEFT model's
    assert trainer.label_names == []
    with pytest.warns(UserWarning, match=r"label_names=\['labels'\].*DPTTrainer"):
        with pytest.raises(ValueError, match="did not return a loss"):  # transformers' own error follows ours
            trainer.train()


@pytest.fixture
def hub_calls(monkeypatch):
    """The Hub's network calls replaced by recorders; the upload reads each file as the real one would."""
    calls = SimpleNamespace(create_repo=[], commits=[], uploads={})

    def create_repo(self, repo_id, **kwargs):
        calls.create_repo.append({"repo_id": repo_id, **kwargs})
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        calls.commits.append({"repo_id": repo_id, **kwargs})
        for operation in operations:
            with open(operation.path_or_fileobj, "rb") as f:
                calls.uploads[operation.path_in_repo] = f.read()
        return SimpleNamespace(commit_url=f"https://hub/{repo_id}/commit/1", oid="1")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def test_push_to_hub_takes_transformers_keyword_arguments(hub_calls, tmp_path):
    model = get_peft_model(load_base_model(), DPTConfig(class_names=["circle", "square"], num_text_tokens=4))
    model.push_to_hub(
        "someone/shapes",
        tags=["my-tag", "vision"],
        private=True,
        commit_message="First adapter",
        safe_serialization=True,
        max_shard_size="5GB",
    )
    assert hub_calls.create_repo == [{"repo_id": "someone/shapes", "private": True, "exist_ok": True}]
    assert [c["commit_message"] for c in hub_calls.commits] == ["First adapter"]
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} == set(hub_calls.uploads)
    (tmp_path / "README.md").write_bytes(hub_calls.uploads["README.md"])
    tags = ModelCard.load(tmp_path / "README.md").data.tags
    assert {"my-tag", "vision", "dpt"} <= set(tags) and len(tags) == len(set(tags))  # added to ours, once each


def test_push_to_hub_refuses_pickling_and_unknown_arguments_before_any_upload(hub_calls):
    model = get_peft_model(load_base_model(), DPTConfig(class_names=["circle", "square"], num_text_tokens=4))
    with pytest.raises(ValueError, match="safe_serialization=False: DPT adapters are only saved as safetensors"):
        model.push_to_hub("someone/shapes", safe_serialization=False)
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['shard_everything'\]"):
        model.push_to_hub("someone/shapes", shard_everything=True)
    assert hub_calls.create_repo == [] and hub_calls.commits == []


def given_run(data: DatasetDict, output_dir: str, resume: bool = False) -> dict:
    arguments = TrainArguments(
        dataset=data,
        shots=2,
        epochs=1,
        report_to="none",
        output_dir=output_dir,
        resume_from_checkpoint="latest" if resume else None,
    )
    return train(arguments, {"num_text_tokens": 4})


def test_a_given_dataset_dict_resumes_only_on_the_same_images_and_labels():
    with tempfile.TemporaryDirectory() as output_dir:
        first = given_run(DatasetDict(toy_dataset("shape")), output_dir)
        relabelled = DatasetDict(toy_dataset("shape"))
        classes = len(relabelled["train"].features["label"].names)
        relabelled["train"] = relabelled["train"].map(lambda row: {"label": (row["label"] + 1) % classes})
        with pytest.raises(ValueError, match=r"data_fingerprint: the training images changed or were relabelled"):
            given_run(relabelled, output_dir, resume=True)
        # the same data built again (new in-memory Dataset objects) resumes
        resumed = given_run(DatasetDict(toy_dataset("shape")), output_dir, resume=True)
        assert resumed["accuracy"] == pytest.approx(first["accuracy"])


def test_the_data_fingerprint_covers_the_labels_of_the_same_images():
    def fingerprint(train: Dataset, label_column: str | None = "label") -> str:
        return data_fingerprint({"task": SimpleNamespace(train=train)}, "image", label_column)

    images = toy_dataset("shape")["train"].select(range(12))
    relabelled = images.map(lambda row: {"label": (row["label"] + 1) % 3})
    assert fingerprint(images, label_column=None) == fingerprint(relabelled, label_column=None)  # the same images
    assert fingerprint(images) != fingerprint(relabelled)
    assert fingerprint(images) == fingerprint(toy_dataset("shape")["train"].select(range(12)))  # built again: same
