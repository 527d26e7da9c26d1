"""DPT through transformers' and PEFT's own entry points (issue 13): `pipeline("dpt-image-classification")`,
`AutoDPTModel.from_pretrained`, and what `pipeline("zero-shot-image-classification")` and
`inject_adapter_in_model` do with a DPT adapter.

Hub access is faked at the download functions only (a local directory stands in for the Hub's storage and the
"downloads" land in a temporary cache, as real ones would); any other attempt to reach the network fails the test.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import peft.config
import peft.utils.save_and_load
import pytest
import torch
import transformers.image_utils
import transformers.utils.hub
from helpers import CLASS_NAMES
from huggingface_hub.utils import httpx
from peft import AutoPeftModel, LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from PIL import Image
from transformers import AutoImageProcessor, CLIPModel, pipeline

import dpt_peft.integrations.pipeline as pipeline_module
from dpt_peft import DPTConfig, DPTPeftModel
from dpt_peft.integrations.auto import AutoDPTModel
from dpt_peft.integrations.pipeline import DEFAULT_URL_TIMEOUT, TASK, DPTImageClassificationPipeline
from dpt_peft.layer import DPTLayer
from dpt_peft.sources import TOY_CLIP_ID, resolve

REPO_ID = "someone/dpt-tiny-clip"
METHODS = ("dpt", "vpt", "coop")


@pytest.fixture(scope="module")
def adapters(clip_path, tmp_path_factory) -> dict[str, Path]:
    """One saved adapter per mechanism mix (CAVPT, VPT only, CoOp only), on the tiny CLIP."""
    folder = tmp_path_factory.mktemp("adapters")
    for seed, method in enumerate(METHODS):
        torch.manual_seed(seed)
        model = get_peft_model(
            CLIPModel.from_pretrained(clip_path), DPTConfig.for_method(method, class_names=CLASS_NAMES)
        )
        model.save_pretrained(folder / method)
    return {method: folder / method for method in METHODS}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("images")
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return sorted(folder.glob("*.png"))


@pytest.fixture
def no_network(monkeypatch):
    """Any name lookup (the first step of every real connection) fails at once and is recorded."""
    attempts = []

    def getaddrinfo(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(f"network disabled in tests ({host})")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, no_network):
    """Repos as directories under `storage`; a "download" copies the file into a temporary HF cache, as the real
    `hf_hub_download` does (transformers reads the cache, PEFT the returned path)."""
    storage, cache = tmp_path / "hub", tmp_path / "hf_cache"
    requested = []

    def hf_hub_download(repo_id, filename, subfolder=None, revision=None, cache_dir=None, **kwargs):
        requested.append((repo_id, filename))
        source = storage / repo_id / (subfolder or "") / filename
        if not source.exists():
            raise huggingface_hub.errors.EntryNotFoundError(f"{repo_id} has no {filename}")
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        repo_cache = Path(cache_dir or cache) / f"models--{repo_id.replace('/', '--')}"
        (repo_cache / "refs").mkdir(parents=True, exist_ok=True)
        (repo_cache / "refs" / "main").write_text(commit)
        target = repo_cache / "snapshots" / commit / (subfolder or "") / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return str(target)

    def file_exists(repo_id, filename, **kwargs):
        return (storage / repo_id / filename).exists()

    def resolve_revision(self, repo_id, revision=None, **kwargs):
        return revision  # the stand-in Hub has no commits to pin

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(transformers.utils.hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(peft.config, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(peft.utils.save_and_load, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(peft.utils.save_and_load, "file_exists", file_exists)
    monkeypatch.setattr(huggingface_hub.HfApi, "resolve_revision", resolve_revision)
    return SimpleNamespace(storage=storage, requested=requested, network_attempts=no_network)


def loaded(adapter_dir) -> DPTPeftModel:
    return AutoDPTModel.from_pretrained(adapter_dir)


def pixels_of(paths, clip_path) -> torch.Tensor:
    processor = AutoImageProcessor.from_pretrained(clip_path)
    return processor(images=[Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]


def softmax_scores(model, pixel_values, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixel_values, **kwargs).logits.float().softmax(-1)


def as_dict(result: list[dict]) -> dict[str, float]:
    return {row["label"]: row["score"] for row in result}


def saved_files(model, folder) -> dict[str, bytes]:
    model.save_pretrained(folder)
    return {name: (Path(folder) / name).read_bytes() for name in ("adapter_model.safetensors", "adapter_config.json")}


# ---------------------------------------------------------------------- the pipeline
def test_pipeline_from_a_model_instance_scores_like_the_model(adapters, images, clip_path):
    model = loaded(adapters["dpt"])
    classifier = pipeline(TASK, model=model, device="cpu")
    assert isinstance(classifier, DPTImageClassificationPipeline)

    result = classifier(str(images[0]))
    assert {row["label"] for row in result} == set(CLASS_NAMES)
    assert [row["score"] for row in result] == sorted((row["score"] for row in result), reverse=True)
    assert sum(row["score"] for row in result) == pytest.approx(1.0)
    expected = softmax_scores(model, pixels_of(images[:1], clip_path))[0]
    assert as_dict(result) == pytest.approx(dict(zip(CLASS_NAMES, expected.tolist())), rel=1e-6)

    top = classifier(Image.open(images[0]), top_k=2)
    assert top == result[:2]


def test_pipeline_takes_lists_in_batches(adapters, images):
    classifier = pipeline(TASK, model=loaded(adapters["vpt"]), device="cpu")
    one_by_one = classifier([str(p) for p in images])
    batched = classifier([str(p) for p in images], batch_size=2, top_k=3)
    assert len(one_by_one) == len(batched) == 3
    for single, batch in zip(one_by_one, batched):
        assert len(batch) == 3 and [row["label"] for row in batch] == [row["label"] for row in single[:3]]
        assert [row["score"] for row in batch] == pytest.approx([row["score"] for row in single[:3]], rel=1e-5)


def test_pipeline_from_an_adapter_dir_in_float32_and_bfloat16(adapters, images, clip_path):
    reference = pipeline(TASK, model=loaded(adapters["dpt"]), device="cpu")(str(images[0]))
    full = pipeline(
        TASK, model=str(adapters["dpt"]), image_processor=clip_path, device="cpu", torch_dtype=torch.float32
    )
    assert isinstance(full.model, DPTPeftModel) and full.model.get_base_model().dtype == torch.float32
    assert full(str(images[0])) == reference

    half = pipeline(TASK, model=str(adapters["dpt"]), device="cpu", dtype=torch.bfloat16)
    assert half.model.get_base_model().dtype == torch.bfloat16
    result = half(str(images[0]))
    assert sum(row["score"] for row in result) == pytest.approx(1.0, abs=1e-5)
    assert as_dict(result) == pytest.approx(as_dict(reference), abs=0.05)


@pytest.mark.parametrize("method", METHODS)
def test_candidate_labels_apply_to_one_call_and_leave_the_adapter_unchanged(
    method, adapters, images, clip_path, tmp_path
):
    model = loaded(adapters[method])
    classifier = pipeline(TASK, model=model, device="cpu")
    pixel_values = pixels_of(images, clip_path)
    before = (
        list(model.peft_config["default"].class_names),
        saved_files(model, tmp_path / "before"),
        softmax_scores(model, pixel_values),
    )
    rng_state = torch.random.get_rng_state()

    for candidates in (["bird", "fish", "cat"], [*CLASS_NAMES, "bird", "fish"]):  # fewer, then more classes
        result = classifier(str(images[0]), candidate_labels=candidates, hypothesis_template="a photo of {}")
        assert {row["label"] for row in result} == set(candidates)
        assert sum(row["score"] for row in result) == pytest.approx(1.0)

    assert model.peft_config["default"].class_names == before[0] == CLASS_NAMES
    assert model.class_names() == CLASS_NAMES
    assert saved_files(model, tmp_path / "after") == before[1]
    assert torch.equal(softmax_scores(model, pixel_values), before[2])
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # nothing was re-initialized
    assert {row["label"] for row in classifier(str(images[0]))} == set(CLASS_NAMES)  # its own classes again


@pytest.mark.parametrize("method", METHODS)
def test_candidate_scores_equal_the_adapter_switched_to_those_classes(method, adapters, images, clip_path):
    """The candidates' scores are what `set_class_names` would give (on another copy of the adapter)."""
    candidates = ["bird", "fish", "cat"]
    classifier = pipeline(TASK, model=loaded(adapters[method]), device="cpu")
    results = classifier([str(p) for p in images], candidate_labels=candidates, batch_size=3)
    switched = loaded(adapters[method])
    switched.set_class_names(candidates)
    expected = softmax_scores(switched, pixels_of(images, clip_path))
    for result, row in zip(results, expected):
        assert as_dict(result) == pytest.approx(dict(zip(candidates, row.tolist())), rel=1e-5, abs=1e-7)


def test_candidates_equal_to_the_adapters_classes_are_its_own_forward(adapters, images, clip_path):
    model = loaded(adapters["dpt"])
    classifier = pipeline(TASK, model=model, device="cpu")
    own = classifier(str(images[0]))
    assert classifier(str(images[0]), candidate_labels=list(CLASS_NAMES)) == own


def test_hypothesis_template_is_ignored_with_a_note(adapters, images, caplog):
    classifier = pipeline(TASK, model=loaded(adapters["coop"]), device="cpu")
    plain = classifier(str(images[0]))
    with caplog.at_level(logging.WARNING, logger="dpt_peft.integrations.pipeline"):
        templated = classifier(str(images[0]), hypothesis_template="This is a photo of {}.")
    assert templated == plain
    assert "hypothesis_template is ignored" in caplog.text and "learned context" in caplog.text


def test_multitask_adapter_classifies_over_the_task_given(clip_path, images):
    tasks = {"pets": ["cat", "dog"], "things": ["red car", "tree", "sea_turtle"]}
    model = get_peft_model(CLIPModel.from_pretrained(clip_path), DPTConfig(class_names=tasks)).eval()
    classifier = pipeline(TASK, model=model, device="cpu")
    assert {row["label"] for row in classifier(str(images[0]), task="things")} == set(tasks["things"])
    with pytest.raises(ValueError, match="several tasks; pass task="):
        classifier(str(images[0]))
    assert {row["label"] for row in classifier(str(images[0]), candidate_labels=["bird", "fish"])} == {"bird", "fish"}


def test_pipeline_input_errors_name_the_problem(adapters, images, clip_path, tmp_path):
    classifier = pipeline(TASK, model=loaded(adapters["vpt"]), device="cpu")
    with pytest.raises(FileNotFoundError, match="missing.png is not an image file"):
        classifier(str(tmp_path / "missing.png"))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png is not a readable image"):
        classifier(str(tmp_path / "broken.png"))
    with pytest.raises(TypeError, match="candidate_labels must be a list"):
        classifier(str(images[0]), candidate_labels="cat")
    with pytest.raises(ValueError, match="candidate_labels: .*duplicate class names"):
        classifier(str(images[0]), candidate_labels=["cat", "Cat"])
    with pytest.raises(TypeError, match=r"Unexpected argument\(s\) \['topk'\]"):
        classifier(str(images[0]), topk=2)
    with pytest.raises(ValueError, match="top_k=0 must be a positive"):
        classifier(str(images[0]), top_k=0)
    with pytest.raises(TypeError, match="needs a DPT or dpt-peft LoRA adapter.*got CLIPModel"):
        pipeline(TASK, model=CLIPModel.from_pretrained(clip_path), device="cpu")


def test_class_specific_context_refuses_other_candidates(clip_path, images):
    config = DPTConfig.for_method("coop", class_names=CLASS_NAMES, class_specific_context=True)
    classifier = pipeline(TASK, model=get_peft_model(CLIPModel.from_pretrained(clip_path), config), device="cpu")
    assert {row["label"] for row in classifier(str(images[0]), candidate_labels=CLASS_NAMES)} == set(CLASS_NAMES)
    with pytest.raises(ValueError, match="class_specific_context=True.*its own classes"):
        classifier(str(images[0]), candidate_labels=["bird", "fish"])


class FakeResponse:
    """What `httpx.stream` yields: `chunks` of a body, optionally `pause` seconds before each."""

    def __init__(self, chunks: list[bytes], pause: float = 0.0):
        self.chunks, self.pause = chunks, pause

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def raise_for_status(self):
        pass

    def iter_bytes(self):
        for chunk in self.chunks:
            time.sleep(self.pause)
            yield chunk


def test_url_images_are_streamed_with_a_deadline_and_a_cap_and_fail_clearly_offline(adapters, images, monkeypatch):
    classifier = pipeline(TASK, model=loaded(adapters["vpt"]), device="cpu")
    url = "https://example.com/cat.png"
    calls = []
    png = io.BytesIO()
    Image.open(images[0]).save(png, format="PNG")

    def offline(method, address, timeout=None, **kwargs):
        calls.append((address, timeout))
        raise httpx.ConnectError(f"[Errno -2] Name or service not known: {address}")

    monkeypatch.setattr(pipeline_module.httpx, "stream", offline)
    with pytest.raises(ConnectionError, match=f"Could not download the image {url}.*offline"):
        classifier(url)
    assert calls == [(url, DEFAULT_URL_TIMEOUT)]  # never load_image's default of no timeout at all
    with pytest.raises(ConnectionError):
        classifier(url, timeout=2.5)
    assert calls[-1] == (url, 2.5)

    monkeypatch.setattr(pipeline_module.httpx, "stream", lambda *a, **k: FakeResponse([b"<html>"]))
    with pytest.raises(ValueError, match=f"{url} did not return a readable image"):
        classifier(url)
    monkeypatch.setattr(pipeline_module.httpx, "stream", lambda *a, **k: FakeResponse([png.getvalue()]))
    assert classifier(url) == classifier(str(images[0]))

    # A body over the cap is refused as it arrives; a trickling server is stopped by the total deadline.
    monkeypatch.setattr(pipeline_module.httpx, "stream", lambda *a, **k: FakeResponse([b"x" * 1000] * 100))
    with pytest.raises(ValueError, match=r"more than 5000 bytes, the download cap; pass max_download_bytes="):
        classifier(url, max_download_bytes=5000)
    monkeypatch.setattr(pipeline_module.httpx, "stream", lambda *a, **k: FakeResponse([b"x"] * 100, pause=0.05))
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"took over 0.2 s \(the download deadline.*download_deadline="):
        classifier(url, download_deadline=0.2)
    assert time.monotonic() - start < 2
    with pytest.raises(ValueError, match="download_deadline=-1 must be a positive number"):
        classifier(url, download_deadline=-1)


def test_dpt_zero_shot_pipeline_is_the_new_pipeline(adapters, images):
    from dpt_peft import DPTZeroShotPipeline

    model = loaded(adapters["dpt"])
    old = DPTZeroShotPipeline(model)
    assert isinstance(old, DPTImageClassificationPipeline) and old.device.type == "cpu"
    result = old(str(images[0]), candidate_labels=["cat", "dog", "tree"], hypothesis_template="{}")
    assert {row["label"] for row in result} == {"cat", "dog", "tree"}
    assert model.class_names() == CLASS_NAMES
    assert old([str(p) for p in images]) == pipeline(TASK, model=model, device="cpu")([str(p) for p in images])


# ---------------------------------------------------------------------- one-call loading
def test_auto_dpt_model_loads_base_and_adapter_in_one_call(adapters, clip_path, pixel_values):
    model = AutoDPTModel.from_pretrained(adapters["dpt"])
    reference = PeftModel.from_pretrained(CLIPModel.from_pretrained(clip_path), str(adapters["dpt"])).eval()
    assert isinstance(model, DPTPeftModel) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixel_values).logits, reference(pixel_values=pixel_values).logits)

    tuned = AutoDPTModel.from_pretrained(
        str(adapters["dpt"]), torch_dtype=torch.bfloat16, attn_implementation="eager", is_trainable=True
    )
    assert tuned.get_base_model().dtype == torch.bfloat16 and tuned.training
    assert tuned.get_base_model().config._attn_implementation == "eager"
    assert {p.dtype for n, p in tuned.named_parameters() if ".dpt_" in n} == {torch.float32}
    assert all(p.requires_grad == (".dpt_" in n) for n, p in tuned.named_parameters())


def test_auto_dpt_model_base_override_and_missing_base(adapters, clip_path, pixel_values, tmp_path):
    moved = tmp_path / "adapter"
    shutil.copytree(adapters["coop"], moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(OSError, match=r"Could not load the adapter's base CLIP .*gone.*base_model_name_or_path="):
        AutoDPTModel.from_pretrained(moved)
    model = AutoDPTModel.from_pretrained(moved, base_model_name_or_path=clip_path)
    with torch.no_grad():
        expected = AutoDPTModel.from_pretrained(adapters["coop"])(pixel_values=pixel_values).logits
        assert torch.equal(model(pixel_values=pixel_values).logits, expected)


def test_auto_dpt_model_resolves_the_toy_clip_id(tmp_path, pixel_values, no_network):
    clip = CLIPModel.from_pretrained(resolve(TOY_CLIP_ID))
    clip.name_or_path = TOY_CLIP_ID
    adapter = get_peft_model(clip, DPTConfig.for_method("vpt", class_names=["circle", "square"]))
    adapter.save_pretrained(tmp_path, save_embedding_layers=False)  # "auto" would ask the Hub about the toy id
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == TOY_CLIP_ID
    model = AutoDPTModel.from_pretrained(tmp_path)
    assert model.get_base_model().name_or_path == TOY_CLIP_ID
    assert model(pixel_values=pixel_values).logits.shape == (4, 2)
    # transformers' pipeline() reads the base model's config itself, so a toy adapter is passed loaded:
    classifier = pipeline(TASK, model=model, device="cpu")
    assert {row["label"] for row in classifier(pixel_values[0])} == {"circle", "square"}
    assert no_network == []


def test_auto_dpt_model_refuses_other_adapters(clip_path, tmp_path):
    lora = get_peft_model(CLIPModel.from_pretrained(clip_path), LoraConfig(target_modules=["q_proj"], r=2))
    lora.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="a LoRA adapter without classifier_config.json.*PeftModel.from_pretrained"):
        AutoDPTModel.from_pretrained(tmp_path)


def test_peft_auto_peft_model_refuses_task_types_so_auto_dpt_model_is_its_dpt_counterpart(adapters):
    # PEFT's AutoPeftModel raises for any config with a task type before it looks up a PeftModel class, and
    # DPTConfig needs its task type to get DPTPeftModel; AutoDPTModel is the AutoPeftModel subclass for DPT.
    with pytest.raises(ValueError, match="Cannot use `AutoPeftModel` with a task type"):
        AutoPeftModel.from_pretrained(str(adapters["vpt"]))
    assert issubclass(AutoDPTModel, AutoPeftModel) and AutoDPTModel._target_peft_class is DPTPeftModel


@pytest.mark.parametrize("method", METHODS)
def test_low_cpu_mem_usage_loads_the_same_adapter(method, adapters, clip_path, pixel_values):
    reference = AutoDPTModel.from_pretrained(adapters[method])
    model = AutoDPTModel.from_pretrained(adapters[method], low_cpu_mem_usage=True)
    direct = PeftModel.from_pretrained(
        CLIPModel.from_pretrained(clip_path), str(adapters[method]), low_cpu_mem_usage=True
    ).eval()
    for candidate in (model, direct):
        assert not any(p.is_meta for p in candidate.parameters())
        assert {p.dtype for n, p in candidate.named_parameters() if ".dpt_" in n} == {torch.float32}
        with torch.no_grad():
            assert torch.equal(candidate(pixel_values=pixel_values).logits, reference(pixel_values=pixel_values).logits)


def test_auto_dpt_model_and_pipeline_from_a_hub_repo_id(adapters, images, fake_hub, pixel_values):
    shutil.copytree(adapters["dpt"], fake_hub.storage / REPO_ID)
    model = AutoDPTModel.from_pretrained(REPO_ID)
    assert (REPO_ID, "adapter_config.json") in fake_hub.requested
    assert (REPO_ID, "adapter_model.safetensors") in fake_hub.requested
    with torch.no_grad():
        expected = AutoDPTModel.from_pretrained(adapters["dpt"])(pixel_values=pixel_values).logits
        assert torch.equal(model(pixel_values=pixel_values).logits, expected)

    classifier = pipeline(TASK, model=REPO_ID, device="cpu")
    assert isinstance(classifier.model, DPTPeftModel)
    assert classifier(str(images[0])) == pipeline(TASK, model=str(adapters["dpt"]), device="cpu")(str(images[0]))
    assert fake_hub.network_attempts == []


# ---------------------------------------------------------------------- what the generic entry points do
@pytest.mark.parametrize("method", ["vpt_coop", "coop", "dpt"])
def test_inject_adapter_in_model_refuses_dpt(method, clip_path):
    clip = CLIPModel.from_pretrained(clip_path)
    with pytest.raises(ValueError, match="inject_adapter_in_model.*does not support.*DPT.*get_peft_model"):
        inject_adapter_in_model(DPTConfig.for_method(method, class_names=CLASS_NAMES), clip)
    assert not any(isinstance(module, DPTLayer) for module in clip.modules())


@pytest.mark.parametrize("method", METHODS)
def test_zero_shot_image_classification_refuses_a_dpt_adapter_dir(method, adapters):
    # transformers finds adapter_config.json, loads the recorded base CLIP and injects the adapter into it with
    # inject_adapter_in_model; CLIP's own forward would then ignore the learned text context (plain-CLIP scores).
    with pytest.raises(ValueError, match=r"(?s)Could not load model .*does not support.*DPT.*get_peft_model"):
        pipeline("zero-shot-image-classification", model=str(adapters[method]), device="cpu")


def test_zero_shot_image_classification_refuses_a_dpt_model(adapters, images, clip_path):
    classifier = pipeline(
        "zero-shot-image-classification",
        model=loaded(adapters["coop"]),
        tokenizer=clip_path,
        image_processor=clip_path,
        device="cpu",
    )
    with pytest.raises(ValueError, match="takes no input_ids"):
        classifier(str(images[0]), candidate_labels=["cat", "dog"])
