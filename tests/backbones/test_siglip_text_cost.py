"""SigLIP's text cost (issue 22, benchmarks): what would and would not bring it down, tested on tiny random SigLIPs,
and the benchmark at a SigLIP shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CLASS_NAMES
from peft import get_peft_model
from siglip_helpers import TEXT_CONTEXT, save_tiny_siglip
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer, SiglipModel

from dpt_peft import DPTConfig

REPO = Path(__file__).resolve().parents[2]
BENCH_TRAIN = REPO / "benchmarks" / "bench_train.py"


@pytest.fixture(scope="module")
def siglip_path(tmp_path_factory) -> str:
    return save_tiny_siglip(tmp_path_factory.mktemp("tiny_siglip"), pad_token="</s>")  # as SiglipTokenizer pads


def text_features(model: SiglipModel, tokenizer, texts: list[str], length: int) -> torch.Tensor:
    input_ids = tokenizer(texts, padding="max_length", max_length=length, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model.get_text_features(input_ids=input_ids).pooler_output


def test_a_shorter_padded_length_changes_the_pooled_text_feature(siglip_path):
    """Cutting SigLIP's prompts shorter than its 64-token context is no exact shortcut (unlike CLIP's cut after the
    end token): every position attends to the padding, and the pooled position is the last one."""
    model = SiglipModel.from_pretrained(siglip_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(siglip_path)
    texts = [f"a photo of a {name.replace('_', ' ')}." for name in CLASS_NAMES]
    longest = len(tokenizer(texts, padding="longest")["input_ids"][0])
    full = text_features(model, tokenizer, texts, TEXT_CONTEXT)
    for length in (longest, TEXT_CONTEXT // 2):
        cut = text_features(model, tokenizer, texts, length)
        relative = (cut - full).norm(dim=-1) / full.norm(dim=-1)
        assert relative.min() > 0.2, (length, relative)  # measured 0.77-0.87 at the longest prompt's length
        assert torch.nn.functional.cosine_similarity(cut, full, dim=-1).max() < 0.95


def module_flops(model, pixel_values: torch.Tensor) -> tuple[int, int]:
    """FLOPs of one inference call: in total, and in the text tower."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixel_values=pixel_values)
    text = sum(
        sum(counts.values()) for name, counts in counter.get_flop_counts().items() if name.endswith(".text_model")
    )
    return counter.get_total_flops(), text


@pytest.mark.parametrize("method", ["coop", "dpt"])
def test_the_class_feature_cache_makes_inference_text_free(siglip_path, pixel_values, method):
    """Cached, an inference call runs no text tower at all and costs exactly the uncached call less its text side;
    CoOp's is then one bare image pass (DPT adds its frozen zero-shot image pass for CAVPT's top-K, and prompts)."""
    flops = {}
    for cache in (True, False):
        config = DPTConfig.for_method(method, class_names=CLASS_NAMES, cache_class_features=cache)
        model = get_peft_model(SiglipModel.from_pretrained(siglip_path), config).eval()
        with torch.no_grad():
            model(pixel_values=pixel_values)  # fills the cache
        flops[cache] = module_flops(model, pixel_values)
    (cached, cached_text), (uncached, uncached_text) = flops[True], flops[False]
    assert cached_text == 0 and uncached_text > 0
    assert cached == uncached - uncached_text
    if method == "coop":
        bare = SiglipModel.from_pretrained(siglip_path).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            bare.get_image_features(pixel_values=pixel_values)
        assert cached == pytest.approx(counter.get_total_flops(), rel=0.01)  # + the logits


def test_the_siglip_b16_shape_is_siglip_base_patch16_224(tmp_path):
    """The benchmark's SigLIP-B/16 builds (on the meta device: no memory) with its 64-token tokenizer, at the size
    of google/siglip-base-patch16-224 (203M parameters)."""
    sys.path.insert(0, str(BENCH_TRAIN.parent))
    try:
        import bench_train
    finally:
        sys.path.remove(str(BENCH_TRAIN.parent))
    bench_train._save_tokenizer("siglip-b16", str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.model_max_length == 64
    with torch.device("meta"):
        model = bench_train._base_model("siglip-b16", tokenizer)
    assert isinstance(model, SiglipModel) and model.config.text_config.max_position_embeddings == 64
    assert sum(p.numel() for p in model.parameters()) == 203_155_970
    assert model.config.text_config.pad_token_id == tokenizer.pad_token_id


def run_bench(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH_TRAIN), *arguments], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_benchmark_script_runs_on_a_tiny_siglip(tmp_path):
    output = tmp_path / "bench.json"
    completed = run_bench(
        "--shape", "siglip-tiny", "--classes", "3", "--methods", "dpt", "--steps", "1", "--warmup", "0",
        "--batch_size", "4", "--json", str(output),
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = json.loads(output.read_text())
    assert [row["text_encoding"] for row in rows] == ["auto"]  # SigLIP has no shared prefix: auto is the full path
    row = rows[0]
    for key in (
        "baseline_images_per_s",
        "images_per_s",
        "speedup",
        "baseline_peak_mem_mb",
        "peak_mem_mb",
        "flops_per_step",
        "text_share",
        "text_flops_per_step",
        "infer_cost_in_bare_passes",
        "max_logit_diff_fp32",
    ):
        assert row[key] is not None, key
    assert (row["family"], row["shape"], row["method"], row["num_classes"]) == ("siglip", "siglip-tiny", "dpt", 3)
    assert row["max_logit_diff_fp32"] < 1e-4 and 0 < row["text_share"] < 1


@pytest.mark.slow
def test_benchmark_refuses_the_shared_prefix_for_siglip():
    completed = run_bench("--shape", "siglip-tiny", "--text_encodings", "shared_prefix")
    assert completed.returncode == 2
    assert "--text_encodings shared_prefix" in completed.stderr and "bidirectional" in completed.stderr
