"""The toy tasks' test set is the same for every seed (as a benchmark's is), so an adapter is scored on the images
its training reported whatever seed its evaluation is given; toy-colour splits into base and new halves."""

from __future__ import annotations

import numpy as np

from dpt_peft.data.coop_splits import subsample_classes
from dpt_peft.toy.tasks import toy_dataset


def pixels(split) -> np.ndarray:
    return np.stack([np.asarray(image) for image in split["image"][:20]])


def test_the_test_set_does_not_depend_on_the_seed():
    first, second = toy_dataset("position", seed=0), toy_dataset("position", seed=1)
    np.testing.assert_array_equal(pixels(first["test"]), pixels(second["test"]))
    assert first["test"]["label"] == second["test"]["label"]
    assert not np.array_equal(pixels(first["train"]), pixels(second["train"]))  # the pool is the seed's own


def test_toy_colour_has_a_base_and_a_new_half():
    dataset = toy_dataset("colour", seed=1)
    base, new = subsample_classes(dataset, "base")["test"], subsample_classes(dataset, "new")["test"]
    assert base.features["label"].names == ["red", "green", "blue", "yellow"]
    assert new.features["label"].names == ["purple", "orange", "white", "cyan"]
    assert len(base) + len(new) == len(dataset["test"])
