"""`DataSpec`: what the data layer needs to know about a run, and nothing else (it never sees the training flags)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DataSpec:
    """Which data a run trains and is tested on. Fields are named as the flags that set them, so error messages can
    name the flag to change."""

    datasets: tuple[str, ...]  # one per task
    data_root: str | None
    split_file: str | None
    subsample_classes: str  # "all", "base" or "new"
    image_column: str
    label_column: str
    class_names_file: str | None
    train_split: str
    test_split: str | None
    shots: int
    seed: int
    eval_every: int  # a few-shot validation set is drawn when > 0
    skip_missing_images: bool = False  # CoOp datasets: leave out listed images the disk lacks, else fail
    given: dict = field(default_factory=dict, compare=False)  # datasets objects given in Python, by task name
