"""The linear probe as a model: the frozen features it classifies (`FrozenFeatures`, one pass over a split's images),
its weights as a saved probe (probe/: safetensors weights and a JSON record of the classes, the base model and the
search; no pickle) read back with checks, and a saved probe scored on a dataset split (`dpt-peft evaluate`). The
training run is `linear_probe.py`'s."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from datasets import Dataset
from peft import get_peft_model
from safetensors.numpy import load_file, save_file
from torch.utils.data import DataLoader

from ..config import DPTConfig
from ..data.batching import ReportingImageBatcher, SkipCounter, undecoded
from ..data.coop_readers import missing_images
from ..data.loaders import EvalLoader, loader_kwargs
from ..sources import TOY_CLIP_ID, load_base_model, load_image_processor
from ..utils.errors import UserInputError
from ..utils.write_policy import OutputFolder
from .arguments import SHIPPED_CONFIG_DEFAULTS
from .evaluation import (
    EVAL_REPORTS,
    EvaluationSpec,
    SplitMetrics,
    split_metrics,
    write_evaluation_report,
)
from .run_dir import RunDir

PROBE_DIR = "probe"  # in the run's --output_dir: the weights and what they classify
PROBE_WEIGHTS = "linear_probe.safetensors"  # "weight" [C, P] and "bias" [C], float64
PROBE_CONFIG = "linear_probe.json"
PROBE_FORMAT = "dpt_peft-linear-probe"
FEATURES = "the frozen model's projected image features (get_image_features), not normalized"


@dataclass(frozen=True)
class SplitFeatures:
    """One split's features `[N, P]` (float64), labels `[N]` and zero-shot predictions `[N]`."""

    features: np.ndarray
    labels: np.ndarray
    zero_shot_predictions: np.ndarray


@dataclass(frozen=True)
class FeatureSpec:
    """Where the frozen features come from and how the images are read."""

    model_name_or_path: str | None
    attn_implementation: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    batch_size: int = 256
    num_workers: int = 0


class FrozenFeatures:
    """The frozen model of a probe: each split's image features and zero-shot predictions, one pass over its images.
    The model is a DPT model of `config` with its adapter bypassed: plain image features, and the zero-shot
    classifier of `config.zero_shot_template` exactly as a DPT run scores it."""

    def __init__(self, config: DPTConfig, spec: FeatureSpec):
        self.spec = spec
        base = load_base_model(spec.model_name_or_path, attn_implementation=spec.attn_implementation)
        self.processor = load_image_processor(spec.model_name_or_path)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = get_peft_model(base, config).to(self.device).eval()
        self.skips = SkipCounter()

    @torch.no_grad()
    def of(self, dataset: Dataset) -> SplitFeatures:
        spec = self.spec
        batcher = ReportingImageBatcher(self.processor, spec.image_column, spec.label_column)
        decoding = loader_kwargs(spec.num_workers) if spec.num_workers else {}
        loader = DataLoader(dataset, batch_size=spec.batch_size, collate_fn=batcher, **decoding)
        text = self.model.zero_shot_text_features()
        features, labels, zero_shot = [], [], []
        for batch in EvalLoader(loader, self.skips):
            images = self.model.zero_shot_image_features(batch["pixel_values"].to(self.device))
            zero_shot.append(self.model.backbone.logits(images, text).argmax(-1).cpu())
            features.append(images.float().cpu())
            labels.append(batch["labels"])
        if not features:
            raise UserInputError("No readable image in a split the probe scores; check the dataset and --image_column.")
        return SplitFeatures(
            torch.cat(features).double().numpy(), torch.cat(labels).numpy(), torch.cat(zero_shot).numpy()
        )


def probe_tensors(classifier, num_classes: int) -> dict[str, np.ndarray]:
    """The classifier as `weight` [C, P] and `bias` [C] whose argmax is its prediction: scikit-learn keeps one row
    for two classes (the logit of class 1), written here as the two rows -w/2, w/2 (the same softmax)."""
    if list(classifier.classes_) != list(range(num_classes)):
        raise UserInputError(f"The training shots hold labels {list(classifier.classes_)}, not 0..{num_classes - 1}.")
    weight, bias = np.asarray(classifier.coef_, dtype=np.float64), np.asarray(classifier.intercept_, np.float64)
    if num_classes == 2:
        weight, bias = np.concatenate([-weight / 2, weight / 2]), np.concatenate([-bias / 2, bias / 2])
    return {"weight": np.ascontiguousarray(weight), "bias": np.ascontiguousarray(bias)}


def probe_logits(tensors: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    return features @ tensors["weight"].T + tensors["bias"]


# ---------------------------------------------------------------------------------------------- the saved probe


def save_probe(run_dir: RunDir, tensors: dict[str, np.ndarray], record: dict) -> None:
    """probe/: safetensors weights and the JSON record, replaced whole (no pickle)."""
    if not all(np.isfinite(value).all() for value in tensors.values()):
        raise UserInputError("The fitted probe holds NaN or infinite weights; it is not saved. Check the features.")

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / PROBE_WEIGHTS))
        (folder / PROBE_CONFIG).write_text(json.dumps(record, indent=2), encoding="utf-8")

    run_dir.write_folder(PROBE_DIR, write)


def is_linear_probe(path: str | Path) -> bool:
    """Whether `path` is a saved probe (its folder, or the run's folder holding probe/)."""
    return _probe_folder(Path(path)) is not None


def _probe_folder(path: Path) -> Path | None:
    for folder in (path, path / PROBE_DIR):
        if (folder / PROBE_CONFIG).is_file() and (folder / PROBE_WEIGHTS).is_file():
            return folder
    return None


def load_probe(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """A saved probe's weights and record, checked: its format, finite weights of the recorded class count."""
    folder = _probe_folder(Path(path))
    if folder is None:
        raise UserInputError(f"{path} holds no linear probe ({PROBE_CONFIG} and {PROBE_WEIGHTS}).")
    record = json.loads((folder / PROBE_CONFIG).read_text(encoding="utf-8"))
    tensors = load_file(str(folder / PROBE_WEIGHTS))
    if not isinstance(record, dict) or record.get("format") != PROBE_FORMAT:
        raise UserInputError(f"{folder / PROBE_CONFIG} is not a dpt_peft linear probe record.")
    weight, bias = tensors.get("weight"), tensors.get("bias")
    classes = len(record.get("class_names") or [])
    if weight is None or bias is None or weight.shape[0] != classes or bias.shape != (classes,):
        raise UserInputError(f"{folder / PROBE_WEIGHTS} does not hold weights for the {classes} recorded classes.")
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise UserInputError(f"{folder / PROBE_WEIGHTS} holds NaN or infinite weights; refusing to use it.")
    return {"weight": weight, "bias": bias}, record


def probe_class_rows(record: dict, class_names: list[str]) -> list[int]:
    """The probe's rows for `class_names`: a probe scores only classes it was trained on (no weights for others)."""
    trained = list(record["class_names"])
    unknown = [name for name in class_names if name not in trained]
    if unknown:
        raise UserInputError(
            f"A linear probe has weights only for the {len(trained)} classes it was trained on; {unknown[0]!r} is not "
            "one of them, so it cannot be scored (prompt methods and LoRA score any class name)."
        )
    return [trained.index(name) for name in class_names]


# The frozen model's classifier: the smallest adapter PEFT builds (one context token, the shortest class prompt),
# never used: features and zero-shot logits are read with the adapter bypassed.
ZERO_SHOT_ONLY = {"learn_text_context": True, "num_text_tokens": 1, "num_visual_tokens": 0, "class_aware": False}


def zero_shot_config(class_names: list[str], overrides: dict) -> DPTConfig:
    """The config of a probe's frozen model: its zero-shot classifier of `overrides`' template over `class_names`."""
    return DPTConfig(**{**overrides, **ZERO_SHOT_ONLY, "class_names": class_names})


def shipped_fit(model_name_or_path: str | None) -> dict:
    """A shipped model's own DPTConfig settings (the toy CLIP's short context), so its zero-shot classifier fits."""
    return dict(SHIPPED_CONFIG_DEFAULTS.get(model_name_or_path or TOY_CLIP_ID, {}))


def evaluate_linear_probe(spec: EvaluationSpec, output_dir: str, *, overwrite_output_dir: bool = False) -> dict:
    """`dpt-peft evaluate` of a saved probe: its accuracy and the zero-shot model's on `spec.split`, whose classes
    must be among the probe's (it has weights for no other), as eval_metrics.json and the per-class chart."""
    reports = OutputFolder(output_dir)
    reports.check(EVAL_REPORTS, "--overwrite_output_dir", overwrite_output_dir)
    tensors, record = load_probe(spec.adapter)
    if spec.splits_classes:
        raise UserInputError(
            "--base_to_new: a linear probe has weights only for the classes it was trained on, so it cannot score "
            "new classes; evaluate it on its own classes (without --base_to_new)."
        )
    if spec.zero_shot_ensemble is not None:
        raise UserInputError("--zero_shot_ensemble mixes an adapter with zero-shot CLIP; a linear probe has none.")
    rows = probe_class_rows(record, spec.class_names)
    model_name = spec.model_name_or_path or record["base_model_name_or_path"]
    template = spec.zero_shot_template or record["zero_shot_template"]
    config = zero_shot_config(spec.class_names, {**shipped_fit(model_name), "zero_shot_template": template})
    frozen = FrozenFeatures(
        config, FeatureSpec(model_name, None, spec.image_column, spec.label_column, spec.batch_size)
    )
    split = undecoded(spec.split, spec.image_column)
    scored = frozen.of(split)
    chosen = {"weight": tensors["weight"][rows], "bias": tensors["bias"][rows]}
    report = {
        "adapter": str(spec.adapter),
        "method": record["method"],
        "zero_shot_template": template,
        "zero_shot_ensemble": None,
        **probe_split_metrics(chosen, scored, spec.class_names, len(frozen.skips)).to_dict(),
        "missing_images": missing_images(split),
    }
    if PartialState().is_main_process:
        write_evaluation_report(report, reports)
    return report


def probe_split_metrics(
    tensors: dict[str, np.ndarray], scored: SplitFeatures, class_names: list[str], skipped_images: int
) -> SplitMetrics:
    """The probe's and the zero-shot classifier's numbers on one split, in the result shape of every evaluation."""
    predictions = probe_logits(tensors, scored.features).argmax(-1)
    return split_metrics(predictions, scored.zero_shot_predictions, scored.labels, class_names, skipped_images)
