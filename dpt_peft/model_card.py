"""The model card written next to every saved adapter (and pushed to the Hub): no template placeholders.

It states the method, the base model (a Hub id when known), the classes, the training data, the metrics as
model-index eval results, the license, and how to load and run the adapter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .config import DPTConfig
from .sources import is_shipped

PAPER = "https://arxiv.org/abs/2208.08340"
CITATION = """@article{xing2023dpt,
  title   = {Dual Modality Prompt Tuning for Vision-Language Pre-Trained Model},
  author  = {Xing, Yinghui and Wu, Qirui and Cheng, De and Zhang, Shizhou and Liang, Guoqiang and Wang, Peng and
             Zhang, Yanning},
  journal = {IEEE Transactions on Multimedia},
  year    = {2023}
}"""
# DPT's part of a card, so that saving into the same folder again replaces it and keeps whatever else the card says.
SECTION_START = "<!-- dpt_peft: adapter section (rewritten on each save) -->"
SECTION_END = "<!-- dpt_peft: end of adapter section -->"


@dataclass
class ModelCardInfo:
    """What the adapter itself cannot know: set by the training run (or by hand) before saving."""

    base_model_id: str | None = None  # the Hub id of the base model when it was loaded from a local copy
    dataset: str | None = None  # the training data, e.g. "oxford_pets" or a Hub dataset id
    shots: int | None = None
    metrics: dict = field(default_factory=dict)  # metrics.json of the run: accuracy, zero_shot_accuracy, ...
    license: str = "apache-2.0"


def _base_model(config: DPTConfig, info: ModelCardInfo) -> tuple[str | None, str]:
    """(Hub id or None, how to describe it): a local path is no Hub id."""
    recorded = config.base_model_name_or_path or ""
    if info.base_model_id:
        return info.base_model_id, f"`{info.base_model_id}`"
    if is_shipped(recorded):
        return None, f"a model shipped with dpt_peft (`{recorded}`)"
    if not recorded or os.path.isabs(recorded) or os.path.exists(recorded):
        return None, "a local CLIP (its Hub id was not given: pass `--base_model_id` when training)"
    return recorded, f"`{recorded}`"


def _eval_results(info: ModelCardInfo) -> list[EvalResult] | None:
    metrics = {k: v for k, v in info.metrics.items() if k in ("accuracy", "mean_per_class_accuracy") and v is not None}
    if not metrics or not info.dataset:
        return None
    return [
        EvalResult(
            task_type="image-classification",
            dataset_type=info.dataset,
            dataset_name=info.dataset,
            metric_type=name,
            metric_name=name.replace("_", " "),
            metric_value=value,
        )
        for name, value in metrics.items()
    ]


def build_model_card(
    configs: dict[str, DPTConfig],
    info: ModelCardInfo,
    existing: ModelCard | None = None,
    base_model_tags: Iterable[str] = (),
) -> ModelCard:
    """The card of a saved DPT model (one section per adapter), or `existing` updated as PEFT updates a card.

    An existing card keeps its text and metadata: DPT's section (between `SECTION_START` and `SECTION_END`) is
    replaced where an earlier save wrote it and appended otherwise; tags are merged (the card's, the base model's
    `add_model_tags`, DPT's), `library_name` is `peft`, and the base model, metrics and data are DPT's when it knows
    them."""
    first = next(iter(configs.values()))
    base_id, base_text = _base_model(first, info)
    data = ModelCardData(
        library_name="peft",
        base_model=base_id,
        license=info.license,
        pipeline_tag="image-classification",
        tags=["dpt", "prompt-tuning", first.base_model_family or "clip", "peft", "image-classification"],
        datasets=[info.dataset] if info.dataset and "/" in info.dataset else None,
        model_name=f"DPT adapter of {base_id or 'CLIP'}",
        eval_results=_eval_results(info),
    ).to_dict()
    text = "\n".join([SECTION_START, _body(configs, info, base_id, base_text), SECTION_END]) + "\n"
    if existing is not None:
        data, text = _merged(existing, data, text)
    data["tags"] = list(dict.fromkeys([*data.get("tags", []), *base_model_tags]))
    return ModelCard(f"---\n{ModelCardData(**data).to_yaml()}\n---\n\n{text}")


def _merged(existing: ModelCard, ours: dict, section: str) -> tuple[dict, str]:
    """An existing card's metadata and text with DPT's merged in (see `build_model_card`)."""
    data = existing.data.to_dict()
    tags = list(dict.fromkeys([*(data.get("tags") or []), *ours.pop("tags")]))
    for key in ("license", "pipeline_tag", "model_name"):  # the card's own choice stays
        if data.get(key):
            ours.pop(key, None)
    data.update(ours)
    data["tags"] = tags
    text = existing.text
    start, end = text.find(SECTION_START), text.find(SECTION_END)
    if 0 <= start < end:
        text = text[:start] + section.rstrip("\n") + text[end + len(SECTION_END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    return data, text


def _body(configs: dict[str, DPTConfig], info: ModelCardInfo, base_id: str | None, base_text: str) -> str:
    sections = [
        f"# DPT adapter of {base_text}",
        "",
        f"Dual-modality Prompt Tuning ([Xing et al., IEEE TMM 2023]({PAPER})) of a frozen CLIP: only prompts are "
        "learned (a text context around each class name, deep visual prompts, and class-aware visual prompts), "
        "trained with `dpt_peft` as a PEFT adapter.",
        "",
        f"- **Base model:** {base_text}",
        f"- **Training data:** {_training_data(info)}",
        f"- **License:** {info.license}",
        "",
    ]
    if info.metrics:
        sections += [_metrics_table(info.metrics), ""]
    for name, config in configs.items():
        sections += [_adapter_section(name, config, base_id), ""]
    sections += ["## Citation", "", "```bibtex", CITATION, "```"]
    return "\n".join(sections)


def _training_data(info: ModelCardInfo) -> str:
    if not info.dataset:
        return "not recorded (saved outside `dpt-peft train`)"
    return f"`{info.dataset}`" + (f", {info.shots} images per class" if info.shots else "")


def _metrics_table(metrics: dict) -> str:
    rows = [
        ("top-1 accuracy", metrics.get("accuracy")),
        ("mean per-class accuracy", metrics.get("mean_per_class_accuracy")),
        ("zero-shot CLIP accuracy (same images)", metrics.get("zero_shot_accuracy")),
    ]
    lines = ["## Results", "", f"On {metrics.get('num_images', 'the')} held-out test images:", ""]
    lines += ["| metric | value |", "|---|---:|"]
    lines += [f"| {name} | {100 * value:.1f}% |" for name, value in rows if value is not None]
    return "\n".join(lines)


def _adapter_section(adapter_name: str, config: DPTConfig, base_id: str | None) -> str:
    mechanisms = [
        name
        for name, on in (
            ("CoOp text context", config.learn_text_context),
            ("deep visual prompts (VPT-deep)", config.has_visual_prompts),
            ("class-aware visual prompts (CAVPT)", config.class_aware),
        )
        if on
    ]
    classes = "\n".join(f"- **{task}** ({len(names)}): " + ", ".join(names) for task, names in config.tasks.items())
    settings = {k: v for k, v in config.to_dict().items() if k != "class_names"}
    load = 'AutoDPTModel.from_pretrained("<this repo or folder>")'
    if base_id is None:
        load = 'AutoDPTModel.from_pretrained("<this repo or folder>", base_model_name_or_path="<your CLIP>")'
    return (
        f"## Adapter `{adapter_name}`\n\n"
        f"- **Mechanisms:** {', '.join(mechanisms) or 'none'}\n\n"
        f"### Classes\n\n{classes}\n\n"
        "### How to use\n\n```python\nimport dpt_peft  # registers DPT with PEFT and its pipeline\n"
        "from dpt_peft import AutoDPTModel\nfrom transformers import pipeline\n\n"
        f"model = {load}\n"
        'classifier = pipeline("dpt-image-classification", model=model)\n'
        'classifier("image.jpg")  # [{"score": ..., "label": ...}, ...]\n```\n\n'
        f"### Config\n\n```json\n{json.dumps(settings, indent=2, sort_keys=True, default=str)}\n```"
    )
