"""Numbers other papers and projects published for the benchmark protocols, printed beside ours, never as ours.

Transcribed from the peers' READMEs and papers, each row with the source it comes from: CLIP ViT-B/16, 16 shots,
3 seeds, unless the source says otherwise. Accuracies in %. The DPT paper's own tables are not here: they were not
published in a form we could read (`DPT_PAPER`), and no cell is filled from memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.catalog import DOMAIN_GENERALIZATION_TARGETS, FEW_SHOT_DATASETS

DPT_PAPER = "not published in a form we could read (the DPT paper's tables; its code holds no results or logs)"
# CLIP-LoRA (Zanella and Ben Ayed, CVPRW 2024): its official README shows the few-shot results only as a figure.
CLIP_LORA_README = (
    "its official README (MaxZanella/CLIP-LoRA, read at commit 358f0d7) shows the few-shot results only as a figure "
    "(few_shot.png), in no table: no cell is transcribed"
)
PER_DATASET_SOURCE = "later papers' copies of the original tables (at least two copies agree on every cell)"
CROSS_DATASET_COLUMNS = ("source_accuracy", *FEW_SHOT_DATASETS[1:], "average")
DOMAIN_GENERALIZATION_COLUMNS = ("source_accuracy", *DOMAIN_GENERALIZATION_TARGETS, "average")


@dataclass(frozen=True)
class PublishedRow:
    """One published row: its protocol and dataset ("average": over the datasets), its metrics keyed as our results
    are (`base_accuracy`, a target's name, ...), in %, and where it comes from."""

    protocol: str
    dataset: str
    method: str
    metrics: dict[str, float]
    source: str


# Base-to-new, average over the 11 datasets: method: (base, new, HM, source).
_BASE_TO_NEW_AVERAGE = {
    "CLIP zero-shot": (69.34, 74.22, 71.7, "MaPLe README (muzairkhattak/multimodal-prompt-learning); PromptSRC README"),
    "CoOp": (82.69, 63.22, 71.66, "MaPLe README (muzairkhattak/multimodal-prompt-learning); PromptSRC README"),
    "CoCoOp": (80.47, 71.69, 75.83, "MaPLe README (muzairkhattak/multimodal-prompt-learning); PromptSRC README"),
    "MaPLe": (82.28, 75.14, 78.55, "MaPLe README"),
    "PromptSRC": (84.26, 76.1, 79.97, "PromptSRC README (muzairkhattak/PromptSRC)"),
    "KgCoOp": (80.73, 73.6, 77.0, "KgCoOp README (htyao89/KgCoOp)"),
    "VPT (re-run by LoGoPrompt, ICCV 2023)": (
        80.81,
        70.36,
        74.68,
        "LoGoPrompt paper, Table 1; HM averaged over datasets, not the HM of the averages",
    ),
    "DPT (re-run by LoGoPrompt, ICCV 2023, with the official code)": (
        81.29,
        29.23,
        44.54,
        "LoGoPrompt paper, Table 1; HM averaged over datasets, not the HM of the averages",
    ),
}
# Base-to-new per dataset: (base, new, HM) of CLIP, CoOp, CoCoOp, MaPLe, PromptSRC, in that order.
_BASE_TO_NEW_METHODS = ("CLIP", "CoOp", "CoCoOp", "MaPLe", "PromptSRC")
_BASE_TO_NEW = {
    "imagenet": (
        (72.43, 68.14, 70.22),
        (76.47, 67.88, 71.92),
        (75.98, 70.43, 73.1),
        (76.66, 70.54, 73.47),
        (77.6, 70.73, 74.01),
    ),
    "caltech101": (
        (96.84, 94.0, 95.4),
        (98.0, 89.81, 93.73),
        (97.96, 93.81, 95.84),
        (97.74, 94.36, 96.02),
        (98.1, 94.03, 96.02),
    ),
    "oxford_pets": (
        (91.17, 97.26, 94.12),
        (93.67, 95.29, 94.47),
        (95.2, 97.69, 96.43),
        (95.43, 97.76, 96.58),
        (95.33, 97.3, 96.3),
    ),
    "stanford_cars": (
        (63.37, 74.89, 68.65),
        (78.12, 60.4, 68.13),
        (70.49, 73.59, 72.01),
        (72.94, 74.0, 73.47),
        (78.27, 74.97, 76.58),
    ),
    "oxford_flowers": (
        (72.08, 77.8, 74.83),
        (97.6, 59.67, 74.06),
        (94.87, 71.75, 81.71),
        (95.92, 72.46, 82.56),
        (98.07, 76.5, 85.95),
    ),
    "food101": (
        (90.1, 91.22, 90.66),
        (88.33, 82.26, 85.19),
        (90.7, 91.29, 90.99),
        (90.71, 92.05, 91.38),
        (90.67, 91.53, 91.1),
    ),
    "fgvc_aircraft": (
        (27.19, 36.29, 31.09),
        (40.44, 22.3, 28.75),
        (33.41, 23.71, 27.74),
        (37.44, 35.61, 36.5),
        (42.73, 37.87, 40.15),
    ),
    "sun397": (
        (69.36, 75.35, 72.23),
        (80.6, 65.89, 72.51),
        (79.74, 76.86, 78.27),
        (80.82, 78.7, 79.75),
        (82.67, 78.47, 80.52),
    ),
    "dtd": (
        (53.24, 59.9, 56.37),
        (79.44, 41.18, 54.24),
        (77.01, 56.0, 64.85),
        (80.36, 59.18, 68.16),
        (83.37, 62.97, 71.75),
    ),
    "eurosat": (
        (56.48, 64.05, 60.03),
        (92.19, 54.74, 68.69),
        (87.49, 60.04, 71.21),
        (94.07, 73.23, 82.35),
        (92.9, 73.9, 82.32),
    ),
    "ucf101": (
        (70.53, 77.5, 73.85),
        (84.69, 56.05, 67.46),
        (82.33, 73.45, 77.64),
        (83.0, 78.66, 80.77),
        (87.1, 78.8, 82.74),
    ),
}
# Cross-dataset: method: (source, the 10 targets in CROSS_DATASET_COLUMNS' order, average of the 10 targets).
_CROSS_DATASET = {
    "CLIP": (66.72, 92.94, 89.07, 65.29, 71.3, 86.11, 24.87, 62.62, 44.56, 47.69, 66.77, 65.12),
    "CoOp": (71.51, 93.7, 89.14, 64.51, 68.71, 85.3, 18.47, 64.15, 41.92, 46.39, 66.55, 63.88),
    "CoCoOp": (71.02, 94.43, 90.14, 65.32, 71.88, 86.06, 22.94, 67.36, 45.73, 45.37, 68.21, 65.74),
    "MaPLe": (70.72, 93.53, 90.49, 65.57, 72.23, 86.2, 24.74, 67.01, 46.49, 48.06, 68.69, 66.3),
    "PromptSRC": (71.27, 93.6, 90.25, 65.7, 70.25, 86.15, 23.9, 67.1, 46.87, 45.5, 68.75, 65.81),
}
# Domain generalization: method: (source, -V2, -Sketch, -A, -R, average of the 4 targets or None).
_DOMAIN_GENERALIZATION = {
    "CLIP": (66.73, 60.83, 46.15, 47.77, 73.96, 57.17),
    "CoOp": (71.51, 64.2, 47.99, 49.71, 75.21, 59.28),
    "CoCoOp": (71.02, 64.07, 48.75, 50.63, 76.18, 59.9),
    "MaPLe": (70.72, 64.07, 49.15, 50.9, 76.98, 60.26),
    "PromptSRC": (71.27, 64.35, 49.55, 50.9, 77.8, 60.65),
    "VPT (LoGoPrompt's re-run)": (70.72, 58.22, 44.67, 43.0, 71.86, None),
    "DPT (LoGoPrompt's re-run)": (69.95, 15.93, 13.41, 9.1, 32.34, None),
}
# Few-shot, 16 shots: CoOp with ResNet-50 (the only per-dataset few-shot row found).
_FEW_SHOT_COOP_RN50 = {
    "imagenet": 62.95,
    "caltech101": 91.83,
    "oxford_pets": 87.01,
    "stanford_cars": 73.36,
    "oxford_flowers": 94.51,
    "food101": 74.67,
    "fgvc_aircraft": 31.26,
    "sun397": 69.26,
    "dtd": 63.58,
    "eurosat": 83.53,
    "ucf101": 75.71,
    "average": 73.42,
}


def _rows() -> tuple[PublishedRow, ...]:
    b2n = ("base_accuracy", "new_accuracy", "harmonic_mean")
    rows = [
        PublishedRow("base_to_new", "average", method, dict(zip(b2n, values[:3])), values[3])
        for method, values in _BASE_TO_NEW_AVERAGE.items()
    ]
    rows += [
        PublishedRow("base_to_new", dataset, method, dict(zip(b2n, values)), PER_DATASET_SOURCE)
        for dataset, cells in _BASE_TO_NEW.items()
        for method, values in zip(_BASE_TO_NEW_METHODS, cells)
    ]
    for protocol, table, columns in (
        ("cross_dataset", _CROSS_DATASET, CROSS_DATASET_COLUMNS),
        ("domain_generalization", _DOMAIN_GENERALIZATION, DOMAIN_GENERALIZATION_COLUMNS),
    ):
        for method, values in table.items():
            re_run = "LoGoPrompt" in method
            source = "LoGoPrompt paper (its re-run)" if re_run else "later papers' copies of the original tables"
            if protocol == "cross_dataset":
                source = "a single third-party copy" if method == "CLIP" else "two or three later papers' copies"
                source += " of the original table"
            metrics = {key: value for key, value in zip(columns, values) if value is not None}
            rows.append(PublishedRow(protocol, "imagenet", method, metrics, source))
    rows += [
        PublishedRow(
            "few_shot",
            dataset,
            "CoOp (ResNet-50, not ViT-B/16)",
            {"accuracy": value},
            "LoGoPrompt Table 2, quoting CoOp",
        )
        for dataset, value in _FEW_SHOT_COOP_RN50.items()
    ]
    return tuple(rows)


PUBLISHED: tuple[PublishedRow, ...] = _rows()


def published_rows(protocol: str, datasets: list[str] | None = None) -> list[PublishedRow]:
    """The published rows of a protocol, for `datasets` (and their average) when given."""
    return [
        row
        for row in PUBLISHED
        if row.protocol == protocol and (datasets is None or row.dataset in datasets or row.dataset == "average")
    ]
