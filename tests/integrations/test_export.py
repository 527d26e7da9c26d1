"""`dpt-peft export` (issue 29): the exported file computes the adapter's own logits at any batch size, serves without
torch (examples/serve_onnx.py predicts as `dpt-peft predict`), records its classes, and bad adapters are refused before
any export. One ONNX export of the tiny CLIP is shared by the module (the ONNX exporter is the slow part)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from helpers import CLASS_NAMES, save_tiny_clip
from peft import get_peft_model
from PIL import Image
from safetensors.torch import load_file, save_file
from siglip_helpers import save_tiny_siglip
from transformers import CLIPModel, SiglipImageProcessor, SiglipModel

from dpt_peft import DPTConfig
from dpt_peft.cli import export_main, predict_main
from dpt_peft.data.images import open_rgb
from dpt_peft.integrations import export
from dpt_peft.integrations.serving import ServingClassifier, export_program
from dpt_peft.sources import load_adapted_model, load_image_processor
from dpt_peft.utils.errors import UserInputError

REPO = Path(__file__).resolve().parents[2]
SERVE = REPO / "examples" / "serve_onnx.py"
# Runs examples/serve_onnx.py as a script, then says which heavy packages it imported.
RUN_SERVE = f"""
import runpy, sys
sys.argv = [{str(SERVE)!r}, *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
heavy = sorted(m for m in ("torch", "transformers", "peft", "dpt_peft") if m in sys.modules)
print("imported:", heavy, file=sys.stderr)
"""


def saved_adapter(base: torch.nn.Module, folder: Path) -> Path:
    torch.manual_seed(0)  # DPT's default: learned context, deep visual prompts and CAVPT (top-K of the frozen pass)
    get_peft_model(base, DPTConfig(class_names=CLASS_NAMES)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter(clip_path, tmp_path_factory) -> Path:
    return saved_adapter(CLIPModel.from_pretrained(clip_path), tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def served(adapter, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("served")
    export_main(["--adapter", str(adapter), "--output_dir", str(folder), "--output_image_embeds"])
    return folder


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Images of other sizes and modes than the model's 32 x 32 RGB: resize, crop and conversion all matter."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("images")
    for i, (width, height) in enumerate([(32, 32), (40, 57), (90, 33), (64, 64)]):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"rgb_{i}.png")
    Image.fromarray(rng.integers(0, 255, (45, 38), dtype=np.uint8)).save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 255, (36, 50, 4), dtype=np.uint8)).save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(folder / "sixteen_bit.png")
    return folder


def pixel_values(processor, count: int = 5) -> torch.Tensor:
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)) for _ in range(count)]
    return processor(images=images, return_tensors="pt")["pixel_values"]


def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_SERVE, *args], capture_output=True, text=True, timeout=120)


def load_serve_module():
    spec = importlib.util.spec_from_file_location("serve_onnx", SERVE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_onnx_outputs_equal_the_adapters_at_batch_1_and_5(served, adapter):
    model, processor = load_adapted_model(adapter, device="cpu")
    pixels = pixel_values(processor)
    with torch.no_grad():
        expected = model(pixel_values=pixels)
    session = onnxruntime.InferenceSession(str(served / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "image_embeds"]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a dynamic batch dimension
    for batch in (1, 5):
        logits, image_embeds = session.run(None, {"pixel_values": pixels[:batch].numpy()})
        np.testing.assert_allclose(logits, expected.logits[:batch].numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(image_embeds, expected.image_embeds[:batch].numpy(), rtol=0, atol=1e-4)


def test_the_folder_records_classes_preprocessing_and_how_to_run_it(served, clip_path):
    session = onnxruntime.InferenceSession(str(served / "model.onnx"), providers=["CPUExecutionProvider"])
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["dpt_peft.class_names"]) == CLASS_NAMES
    assert json.loads((served / "class_names.json").read_text()) == CLASS_NAMES
    saved = json.loads((served / "preprocessor_config.json").read_text())
    assert saved == json.loads((Path(clip_path) / "preprocessor_config.json").read_text())
    readme = (served / "README.md").read_text()
    assert "serve_onnx.py" in readme and "export again with `--class_names`" in readme
    assert "stack_trace" not in (served / "model.onnx").read_bytes().decode("latin-1")  # no paths of this machine


def test_serve_onnx_predicts_as_dpt_peft_predict_without_torch(served, adapter, image_dir, tmp_path):
    rows = predict_main(["--adapter", str(adapter), str(image_dir), "--top_k", "3", "--output", str(tmp_path / "p")])
    completed = run_serve("--model_dir", str(served), str(image_dir), "--top_k", "3", "--json")
    assert completed.returncode == 0, completed.stderr
    assert "imported: []" in completed.stderr
    served_rows = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [r["path"] for r in served_rows] == [r["path"] for r in rows] and len(rows) == 7
    for ours, theirs in zip(served_rows, rows):
        assert ours["labels"] == theirs["labels"]
        assert ours["probabilities"] == pytest.approx(theirs["probabilities"], abs=1e-5)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_serve_onnx_preprocesses_as_the_image_processor(clip_path, image_dir, family):
    serve = load_serve_module()
    if family == "clip":  # resize the short side, centre crop (bicubic)
        processor = load_image_processor(clip_path)
    else:  # SigLIP's own: a fixed size, no crop (bilinear)
        processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    config = json.loads(processor.to_json_string())
    for path in sorted(image_dir.iterdir()):
        expected = processor(images=[open_rgb(path)], return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(serve.preprocess(serve.open_rgb(path), config), expected, rtol=0, atol=1e-6)


def test_a_changed_class_list_needs_a_new_export(served, adapter, image_dir, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(served, edited)
    (edited / "class_names.json").write_text(json.dumps(["cat", "dog"]))
    completed = run_serve("--model_dir", str(edited), str(image_dir))
    assert completed.returncode != 0 and "export again with `dpt-peft export --class_names" in completed.stderr

    other = ["bird", "fish", "red car"]  # a torch.export program in fp16 (float32 in and out), checked on our images
    result = export.export_adapter(
        adapter, tmp_path / "other", class_names=other, format="torch", dtype="fp16", check_images=[str(image_dir)]
    )
    assert result.num_images == 7
    recorded = {"dpt_peft.class_names": ""}
    program = torch.export.load(result.model_file, extra_files=recorded)
    assert json.loads(recorded["dpt_peft.class_names"]) == other
    assert json.loads((tmp_path / "other" / "class_names.json").read_text()) == other
    assert {t.dtype for t in program.state_dict.values() if t.is_floating_point()} == {torch.float16}
    model, processor = load_adapted_model(adapter, class_names=other, device="cpu")
    pixels = pixel_values(processor)
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
        tolerance = export.TOLERANCES["fp16"] * float(model.backbone.logit_scale())
        torch.testing.assert_close(program.module()(pixels), expected, rtol=0, atol=tolerance)


def test_a_program_without_cavpt_and_with_class_specific_contexts_equals_the_adapter(clip_path, pixel_values):
    """VPT+CoOp (no frozen pass, no top-K) with one context per class: the other branch of the serving module."""
    config = DPTConfig.for_method("vpt_coop", class_names=CLASS_NAMES, class_specific_context=True)
    torch.manual_seed(0)
    model = get_peft_model(CLIPModel.from_pretrained(clip_path), config).eval()
    module = ServingClassifier(model)
    assert not module.top_k and not hasattr(module, "zero_shot_class_features")
    program = export_program(module, pixel_values)
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits
        torch.testing.assert_close(program.module()(pixel_values[:1]), expected[:1], rtol=0, atol=1e-5)
        torch.testing.assert_close(program.module()(pixel_values), expected, rtol=0, atol=1e-5)
    assert not [name for name in program.state_dict if "text_model" in name]  # the class side is in buffers


@pytest.mark.parametrize("method", ["dpt", "coop"])
def test_an_adapter_with_a_zero_shot_ensemble_is_served_with_it(clip_path, pixel_values, method):
    """The program's logits are the ensemble's, as `evaluate` and `predict` score the adapter: the log of the mixed
    probabilities (CAVPT's frozen pass reused; without CAVPT a frozen pass of its own)."""
    config = DPTConfig.for_method(method, class_names=CLASS_NAMES, zero_shot_ensemble=0.5)
    torch.manual_seed(0)
    model = get_peft_model(CLIPModel.from_pretrained(clip_path), config).eval()
    program = export_program(ServingClassifier(model), pixel_values)
    with torch.no_grad():
        served = program.module()(pixel_values)
        model.set_zero_shot_ensemble(None)
        own = model(pixel_values=pixel_values, output_zero_shot_logits=True)
    mixed = (0.5 * own.logits.softmax(-1) + 0.5 * own.zero_shot_logits.softmax(-1)).log()
    torch.testing.assert_close(served, mixed, rtol=0, atol=1e-5)
    assert not torch.allclose(served, own.logits, atol=1e-3)


def test_a_tiny_siglip_exports_to_onnx(tmp_path):
    base = save_tiny_siglip(tmp_path / "siglip", pad_token="</s>")
    adapter = saved_adapter(SiglipModel.from_pretrained(base), tmp_path / "adapter")
    model, processor = load_adapted_model(adapter, device="cpu")
    pixels = pixel_values(processor)
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits.numpy()
    session = onnxruntime.InferenceSession(
        str(export.export_adapter(adapter, tmp_path / "onnx").model_file), providers=["CPUExecutionProvider"]
    )
    for batch in (1, 5):
        logits = session.run(None, {"pixel_values": pixels[:batch].numpy()})[0]
        np.testing.assert_allclose(logits, expected[:batch], rtol=0, atol=1e-4)


def test_a_nan_adapter_or_another_base_is_refused_before_export(adapter, tmp_path):
    nan_adapter = shutil.copytree(adapter, tmp_path / "nan")
    tensors = load_file(nan_adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if "dpt_visual_prompts" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, nan_adapter / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"NaN or infinite values in .*dpt_visual_prompts"):
        export.export_adapter(nan_adapter, tmp_path / "out")
    wider = save_tiny_clip(tmp_path / "wider_clip", vision_width=64)
    with pytest.raises(ValueError, match="vision_hidden_size"):
        export.export_adapter(adapter, tmp_path / "out", model_name_or_path=wider)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_onnx_packages_name_the_extra(adapter, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "find_spec", lambda name: None if name == "onnxruntime" else object())
    with pytest.raises(UserInputError, match=r"needs onnxruntime .*pip install dpt-peft\[export\]"):
        export.export_adapter(adapter, tmp_path / "out")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"opset": 17}, "opset 17: torch's dynamo exporter writes opset 18 or later"),
        ({"opset": 18, "format": "torch"}, "opset 18 applies to the onnx format only"),
        ({"dtype": "bf16"}, "choose a format of .* and a dtype of"),
    ],
)
def test_options_the_exporter_cannot_honour_are_refused_before_work(adapter, tmp_path, options, message):
    with pytest.raises(UserInputError, match=message):
        export.export_adapter(adapter, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_an_export_that_differs_from_pytorch_is_refused_and_removed(adapter, tmp_path, monkeypatch):
    runner = export._runner

    def shifted(*args):  # the written file, 0.5 off PyTorch in every logit
        run = runner(*args)
        return lambda pixel_values: [output + 0.5 for output in run(pixel_values)]

    monkeypatch.setattr(export, "_runner", shifted)
    with pytest.raises(export.ExportCheckError, match=r"logits of image 0 \(batch 1\), class '.+', is .* instead of"):
        export.export_adapter(adapter, tmp_path / "out", format="torch")
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == []
