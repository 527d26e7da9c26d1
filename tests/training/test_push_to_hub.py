"""`--push_to_hub`: checked before training as transformers' Trainer does, and a failed push said in one line."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from dpt_peft.training import trainer
from dpt_peft.training.arguments import TrainArguments
from dpt_peft.utils.errors import UserInputError

# The HTTP client's "could not connect" error, as huggingface_hub raises it without a network (the traceback).
ConnectError = importlib.import_module(HfHubHTTPError.__bases__[0].__module__).ConnectError


def arguments(tmp_path, **changes) -> TrainArguments:
    values = dict(shots=1, epochs=1, report_to="none", push_to_hub=True, output_dir=str(tmp_path / "dpt-toy"))
    return TrainArguments(**{**values, **changes})


@pytest.fixture
def no_training(monkeypatch):
    """Training must not start: the refusals come first."""
    monkeypatch.setattr(trainer, "setup", lambda *a, **k: pytest.fail("training started before the refusal"))


@pytest.fixture
def hub(monkeypatch):
    """A token and the Hub's calls replaced by recorders (the upload fails when `fail_upload` is set)."""
    calls = SimpleNamespace(create_repo=[], commits=[], fail_upload=False)

    def create_repo(self, repo_id, **kwargs):
        calls.create_repo.append(repo_id)
        return SimpleNamespace(repo_id=f"someone/{repo_id}" if "/" not in repo_id else repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        if calls.fail_upload:
            raise ConnectError("[Errno -2] Name or service not known")
        calls.commits.append((repo_id, sorted(op.path_in_repo for op in operations)))

    monkeypatch.setattr(trainer, "get_token", lambda: "hf_test")
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def test_an_invalid_repo_id_is_refused_when_the_arguments_are_made(tmp_path):
    """Item 17: the default repo id is the --output_dir folder's name; one that is no Hub id is refused at once."""
    with pytest.raises(UserInputError, match="'my run!', the --output_dir folder's name .* is not a valid Hub repo"):
        arguments(tmp_path, output_dir=str(tmp_path / "my run!"))
    with pytest.raises(UserInputError, match="'a/b/c', --hub_model_id, is not a valid Hub repo id"):
        arguments(tmp_path, hub_model_id="a/b/c")
    assert arguments(tmp_path, push_to_hub=False, output_dir=str(tmp_path / "my run!")).hub_repo_id == "my run!"


def test_offline_mode_and_a_missing_token_are_refused_before_training(tmp_path, monkeypatch, no_training):
    monkeypatch.setattr(trainer.hf_constants, "is_offline_mode", lambda: True)
    with pytest.raises(UserInputError, match="cannot push to 'dpt-toy' with HF_HUB_OFFLINE set"):
        trainer.train(arguments(tmp_path))
    monkeypatch.setattr(trainer.hf_constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(trainer, "get_token", lambda: None)
    with pytest.raises(UserInputError, match="needs a Hub token with write access: run `hf auth login`"):
        trainer.train(arguments(tmp_path))


def test_an_unreachable_hub_is_refused_before_training_in_one_line(tmp_path, monkeypatch, hub, no_training):
    """The issue's case: no network, no offline mode. Trainer creates the repo at init; so do we, before any work."""

    def unreachable(self, repo_id, **kwargs):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    with pytest.raises(UserInputError) as refusal:
        trainer.train(arguments(tmp_path))
    message = str(refusal.value)
    assert "could not be created or reached before training (ConnectError: [Errno -2]" in message
    assert "\n" not in message and not (tmp_path / "dpt-toy").exists()


def test_a_push_that_fails_after_training_says_where_the_adapter_is(tmp_path, hub):
    hub.fail_upload = True
    with pytest.raises(UserInputError) as refusal:
        trainer.train(arguments(tmp_path))
    adapter = tmp_path / "dpt-toy" / "adapter"
    assert str(refusal.value) == (
        "Training finished, but pushing the adapter to 'dpt-toy' failed (ConnectError: [Errno -2] Name or service not "
        f"known). The adapter is saved in {adapter}; push it later with `hf upload dpt-toy {adapter}`."
    )
    assert (adapter / "adapter_model.safetensors").is_file() and (tmp_path / "dpt-toy" / "metrics.json").is_file()
    assert hub.create_repo == ["dpt-toy", "dpt-toy"]  # checked before training, then the push itself


def test_a_push_that_works_uploads_the_adapter(tmp_path, hub):
    metrics = trainer.train(arguments(tmp_path, hub_model_id="someone/shapes"))
    assert metrics["epochs"] == 1
    assert hub.commits == [("someone/shapes", ["README.md", "adapter_config.json", "adapter_model.safetensors"])]
