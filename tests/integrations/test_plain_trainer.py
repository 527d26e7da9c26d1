"""A plain `transformers.Trainer` and `DPTTrainer` as a transformers user runs them: evaluation with compute_metrics,
the logged loss under gradient accumulation, and the public image collator on an imagefolder."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset, load_dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from dpt_peft import DPTConfig, DPTImageCollator, DPTTrainer
from dpt_peft.sources import load_base_model, load_image_processor
from dpt_peft.toy.tasks import toy_dataset
from dpt_peft.training.recipe import Recipe


def accuracy(prediction) -> dict:
    """As transformers' examples write it: a plain Trainer gathers every (batch-first) output, the logits first;
    DPTTrainer hands over the logits alone."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.argmax(logits, -1) == prediction.label_ids).mean())}


@pytest.fixture(scope="module")
def toy():
    processor = load_image_processor()
    data = toy_dataset("position")
    return processor, data["train"].select(range(0, 160, 10)), data["test"].select(range(0, 600, 50))


def new_model(toy_names):
    return get_peft_model(load_base_model(), DPTConfig(class_names=toy_names, num_text_tokens=4))


def names(dataset) -> list[str]:
    return dataset.features["label"].names


def test_a_plain_trainer_evaluates_preprocessed_pixels_with_compute_metrics(toy, tmp_path):
    processor, _, test = toy
    batch = DPTImageCollator(processor)(list(test))
    dataset = Dataset.from_dict(
        {"pixel_values": batch["pixel_values"].numpy(), "labels": batch["labels"].numpy()}
    ).with_format("torch")
    model = new_model(names(test))
    args = TrainingArguments(
        str(tmp_path), per_device_eval_batch_size=5, report_to=[], use_cpu=True, label_names=["labels"]
    )
    metrics = Trainer(model=model, args=args, eval_dataset=dataset, compute_metrics=accuracy).evaluate()
    # no ignore_keys_for_eval: the model's config names the outputs without a batch dimension
    logits = model(**batch).logits.detach()
    assert metrics["eval_accuracy"] == pytest.approx(float((logits.argmax(-1) == batch["labels"]).float().mean()))
    assert metrics["eval_loss"] == pytest.approx(float(model(**batch).loss.detach()), rel=1e-4)


def logged_train_loss(toy, tmp_path, batch_size: int, accumulation: int) -> float:
    processor, train, _ = toy
    args = TrainingArguments(
        str(tmp_path / f"b{batch_size}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        dataloader_drop_last=True,
    )
    trainer = DPTTrainer(
        new_model(names(train)),
        args,
        recipe=Recipe.for_method("dpt", epochs=1, visual_warmup_epochs=0),
        train_dataset=train,
        data_collator=DPTImageCollator(processor),
    )
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][0]


def test_the_logged_loss_is_the_batch_mean_under_gradient_accumulation(toy, tmp_path):
    # one update of 16 images: as 1 batch of 16, or 4 accumulated batches of 4; the same first-step loss
    whole = logged_train_loss(toy, tmp_path, 16, 1)
    accumulated = logged_train_loss(toy, tmp_path, 4, 4)
    assert accumulated == pytest.approx(whole, rel=1e-3)


def test_the_public_collator_trains_on_an_imagefolder_with_augmentation(toy, tmp_path):
    processor, train, test = toy
    for split, data in (("train", train), ("test", test)):
        for i, row in enumerate(data):
            folder = tmp_path / "images" / split / names(data)[row["label"]]
            folder.mkdir(parents=True, exist_ok=True)
            row["image"].save(folder / f"{i}.png")
    images = load_dataset("imagefolder", data_dir=str(tmp_path / "images"))
    assert "__index__" not in images["train"].column_names
    args = TrainingArguments(
        str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_train_epochs=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer = DPTTrainer(
        new_model(names(images["train"])),
        args,
        train_dataset=images["train"],
        eval_dataset=images["test"],
        data_collator=DPTImageCollator(processor, augment=True, seed=1),
        compute_metrics=accuracy,
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert trainer.state.global_step == 2 and 0 <= metrics["eval_accuracy"] <= 1 and metrics["eval_loss"] > 0
