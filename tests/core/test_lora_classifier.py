"""`--method lora`'s model: PEFT's LoraConfig of CLIP-LoRA's recipe, gradients, the classifier cache, save/load
(through dpt_peft and plain PEFT), merge_and_unload, and what is refused."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import CLASS_NAMES, save_tiny_clip
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer, CLIPModel

from dpt_peft.lora_adapter import CLASSIFIER_CONFIG_FILE, LoraClassifierConfig, clip_lora_config
from dpt_peft.lora_classifier import LoraClassifier
from dpt_peft.sources import load_adapter_and_base, read_adapter_config
from dpt_peft.training.arguments import TrainArguments
from dpt_peft.training.setup import build_model


def lora_model(path: str, **recipe) -> LoraClassifier:
    base = AutoModel.from_pretrained(path)
    classifier = LoraClassifierConfig(class_names=CLASS_NAMES)
    return LoraClassifier(base, clip_lora_config(base, **recipe), classifier=classifier, tokenizer=tokenizer(path))


def tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path)


def with_random_b(model: LoraClassifier, seed: int = 0) -> LoraClassifier:
    """B starts at zero (the adapter is the base model then): give it values so that tests see the LoRA's effect."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, (_, parameter) in model.adapter_parameters().items():
            if "lora_B" in key:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model


def test_method_lora_builds_clip_loras_config(base_path, clip_path):
    path, family = base_path, "clip" if base_path == clip_path else "siglip"
    args = TrainArguments(method="lora", model_name_or_path=path, report_to="none", output_dir="unused")
    classifier = LoraClassifierConfig(class_names=CLASS_NAMES)
    model, _ = build_model(args, classifier, {}, from_prototypes=False)
    config = model.active_peft_config
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora) == (2, 1.0, 0.25, True)
    assert config.bias == "none" and config.init_lora_weights is True  # A Kaiming-uniform, B zero: CLIP-LoRA's init
    base = model.get_base_model()
    layers = {"text": base.config.text_config.num_hidden_layers, "vision": base.config.vision_config.num_hidden_layers}
    expected = {
        f"{tower}_model.encoder.layers.{i}.self_attn.{p}_proj"
        for tower, n in layers.items()
        for i in range(n)
        for p in "qkv"
    }
    wrapped = {name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == expected  # both towers, every layer, q/k/v and nothing else
    for module in model.modules():
        if isinstance(module, LoraLayer):
            assert module.r["default"] == 2
            assert module.scaling["default"] == pytest.approx(1 / math.sqrt(2))  # CLIP-LoRA: lora_alpha / sqrt(r)
            assert module.lora_dropout["default"].p == 0.25
    assert model.classifier.logit_scale == 100 and model.classifier.template == "a photo of a {}."
    assert model.classifier.base_model_family == family


def test_gradients_reach_only_lora_matrices_of_both_towers(clip_path, pixel_values, labels):
    model = with_random_b(lora_model(clip_path)).train()
    model(pixel_values=pixel_values, labels=labels).loss.backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    lora = set(model.adapter_parameters())
    assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)
    assert len(trained) == len(lora)  # every A and B of every tower
    assert any("text_model" in name for name in trained) and any("vision_model" in name for name in trained)
    assert all(not p.requires_grad for name, p in model.named_parameters() if "lora_" not in name)


def test_class_features_are_cached_at_inference_and_follow_the_weights(clip_path, pixel_values):
    model = with_random_b(lora_model(clip_path)).eval()
    with torch.no_grad():
        first = model(pixel_values=pixel_values).logits
        assert torch.equal(model(pixel_values=pixel_values).logits, first)
        with_random_b(model, seed=1)  # the text tower's weights change: the cached features must not be reused
        changed = model(pixel_values=pixel_values).logits
        assert not torch.allclose(changed, first)
    with torch.enable_grad():  # a gradient through the text LoRA: computed afresh, never from the cache
        recomputed = model(pixel_values=pixel_values).logits.detach()
    assert torch.equal(recomputed, changed)


def plain_logits(base: CLIPModel, path: str, pixel_values: torch.Tensor, names=CLASS_NAMES) -> torch.Tensor:
    """CLIP-LoRA's logits from a plain model: 100 x cosine of the image and template features."""
    texts = [f"a photo of a {name.replace('_', ' ')}." for name in names]
    ids = tokenizer(path)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        text = base.get_text_features(**ids).pooler_output
        image = base.get_image_features(pixel_values=pixel_values).pooler_output
    text, image = text / text.norm(dim=-1, keepdim=True), image / image.norm(dim=-1, keepdim=True)
    return 100 * image @ text.t()


def test_merge_and_unload_classifies_alike(clip_path, pixel_values):
    model = with_random_b(lora_model(clip_path)).eval()
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
    merged = model.merge_and_unload()
    assert type(merged) is CLIPModel
    torch.testing.assert_close(plain_logits(merged, clip_path, pixel_values), logits, rtol=0, atol=1e-4)


PLAIN_PEFT = """
import json, sys
import torch
from peft import PeftModel
from transformers import AutoTokenizer, CLIPModel
base_path, adapter, pixels = sys.argv[1:4]
model = PeftModel.from_pretrained(CLIPModel.from_pretrained(base_path), adapter).eval()
names = json.load(open(adapter + "/classifier_config.json"))["class_names"]
ids = AutoTokenizer.from_pretrained(base_path)([f"a photo of a {n.replace('_', ' ')}." for n in names],
                                              padding=True, return_tensors="pt")
pixel_values = torch.tensor(json.load(open(pixels)))
with torch.no_grad():
    text = model.get_text_features(**ids).pooler_output
    image = model.get_image_features(pixel_values=pixel_values).pooler_output
text, image = text / text.norm(dim=-1, keepdim=True), image / image.norm(dim=-1, keepdim=True)
print(json.dumps({"logits": (100 * image @ text.t()).tolist(), "dpt_peft": "dpt_peft" in sys.modules}))
"""


def test_saved_adapter_loads_exactly_with_dpt_peft_and_with_plain_peft(clip_path, pixel_values, tmp_path):
    model = with_random_b(lora_model(clip_path)).eval()
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
    model.save_pretrained(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] is None  # a plain PEFT LoRA adapter
    assert isinstance(read_adapter_config(tmp_path / "adapter"), LoraClassifierConfig)

    loaded = load_adapter_and_base(tmp_path / "adapter", clip_path)
    assert isinstance(loaded, LoraClassifier) and not loaded.training
    assert loaded.class_names() == CLASS_NAMES
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixel_values).logits, logits)

    (tmp_path / "pixels.json").write_text(json.dumps(pixel_values.tolist()))
    script = [sys.executable, "-c", PLAIN_PEFT, clip_path, str(tmp_path / "adapter"), str(tmp_path / "pixels.json")]
    done = subprocess.run(script, capture_output=True, text=True, check=True, cwd=tmp_path)
    plain = json.loads(done.stdout.strip().splitlines()[-1])
    assert plain["dpt_peft"] is False
    torch.testing.assert_close(torch.tensor(plain["logits"]), logits, rtol=0, atol=1e-4)


def test_new_classes_score_through_the_lora_text_encoder(clip_path, pixel_values):
    model = with_random_b(lora_model(clip_path)).eval()
    names = ["bird", "fish", "tree"]
    with torch.no_grad():
        for_call = model(pixel_values=pixel_values, class_names=names).logits
        model.set_class_names(names)
        assert torch.equal(model(pixel_values=pixel_values).logits, for_call)
    assert model.class_names() == names and for_call.shape == (4, 3)


def test_bad_settings_and_adapters_are_refused(clip_path, tmp_path):
    base = CLIPModel.from_pretrained(clip_path)
    for settings, flag in (
        ({"r": 0}, "lora_r"),
        ({"dropout": -0.1}, "lora_dropout"),
        ({"targets": ("q", "x")}, "lora_targets"),
        ({"layers": "5"}, "lora_layers"),
        ({"encoder": "audio"}, "lora_encoder"),
    ):
        with pytest.raises(ValueError, match=flag):
            clip_lora_config(base, **settings)
    with pytest.raises(ValueError, match="exactly one"):
        LoraClassifierConfig(class_names=CLASS_NAMES, template="a photo")

    model = with_random_b(lora_model(clip_path))
    model.save_pretrained(str(tmp_path / "adapter"))
    wider = save_tiny_clip(tmp_path / "wider", vision_width=64)
    with pytest.raises(ValueError, match="vision_hidden_size: adapter 48, model 64"):
        load_adapter_and_base(tmp_path / "adapter", wider)

    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if "lora_B" in k)
    save_file({**tensors, key: torch.full_like(tensors[key], float("nan"))}, weights)
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_adapter_and_base(tmp_path / "adapter", clip_path)
    (tmp_path / "adapter" / CLASSIFIER_CONFIG_FILE).unlink()
    with pytest.raises(ValueError, match=f"without {CLASSIFIER_CONFIG_FILE}"):
        load_adapter_and_base(tmp_path / "adapter", clip_path)
    with torch.no_grad():  # a diverged run's matrices are never saved
        next(p for k, (_, p) in model.adapter_parameters().items() if "lora_A" in k).fill_(float("inf"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.save_pretrained(str(tmp_path / "diverged"))
    assert not (tmp_path / "diverged").exists()
