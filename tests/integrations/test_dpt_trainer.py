"""`DPTTrainer`: transformers' Trainer with the paper's recipe, from the same code as the Accelerate loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import TrainingArguments

from dpt_peft import DPTConfig, DPTTrainer
from dpt_peft.data.batching import ImageBatcher
from dpt_peft.integrations.hf_trainer import TrainerCollator
from dpt_peft.sources import load_base_model, load_image_processor
from dpt_peft.toy.tasks import toy_dataset
from dpt_peft.training.recipe import VISUAL_GROUP, Recipe


@pytest.fixture
def setup(tmp_path):
    clip, processor = load_base_model(), load_image_processor()
    data = toy_dataset("position")
    train = data["train"].select(range(0, 160, 10))  # 16 images, 2 steps of 8
    test = data["test"].select(range(0, 600, 50))
    model = get_peft_model(clip, DPTConfig(class_names=data["train"].features["label"].names, num_text_tokens=4))
    return model, processor, train, test


def test_dpt_trainer_applies_the_recipe_and_saves_a_loadable_adapter(setup, tmp_path):
    model, processor, train, test = setup
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_train_epochs=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
    )
    trainer = DPTTrainer(
        model,
        args,
        recipe=Recipe.for_method("dpt", epochs=1, visual_warmup_epochs=0),
        train_dataset=train,
        eval_dataset=test,
        data_collator=ImageBatcher(processor, "image", "label"),
        compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())},
    )
    before = {k: v.clone() for k, v in model.base_model.adapter_parameters().items() for v in [v[1].detach()]}
    trainer.train()
    assert trainer.state.global_step == 2
    groups = {group["name"]: group for group in trainer.optimizer.param_groups}
    assert set(groups) == {"visual", "text"} and groups[VISUAL_GROUP]["momentum"] == pytest.approx(0.9)
    visual, text = trainer.lr_scheduler.lr_lambdas  # during epoch 0: visual without warm-up, text warming up
    assert visual(0) == pytest.approx(1.0) and text(0) == pytest.approx(1e-5 / 0.002)
    changed = [k for k, (_, p) in model.base_model.adapter_parameters().items() if not torch.equal(p, before[k])]
    assert changed  # the prompts trained
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_accuracy"} <= set(metrics)  # labels found without label_names
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(load_base_model(), str(tmp_path / "adapter")).eval()
    pixels = ImageBatcher(processor, "image", "label")([test[0], test[1]])["pixel_values"]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)


def test_a_plain_trainer_reports_eval_loss(setup, tmp_path):
    from transformers import Trainer

    model, processor, train, test = setup
    args = TrainingArguments(
        output_dir=str(tmp_path / "plain"),
        per_device_eval_batch_size=8,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        eval_dataset=test,
        data_collator=TrainerCollator(ImageBatcher(processor, "image", "label")),
    )
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0
    # With no keys_to_ignore_at_inference, Trainer gathers every output but the loss, concatenated over batches:
    # each is batch-first (the class features come only with output_text_embeds=True); the auxiliary loss, a
    # scalar per batch like the loss, gives one value per batch.
    gathered = trainer.predict(test).predictions
    batch = ImageBatcher(processor, "image", "label")([test[0], test[1]])
    with torch.no_grad():
        names = [name for name in model(**batch).keys() if name != "loss"]
    assert len(names) == len(gathered) and "text_embeds" not in names
    for name, value in zip(names, gathered):
        for array in value if isinstance(value, tuple) else (value,):
            assert array.shape[0] == (2 if name == "class_aware_loss" else len(test)), name


def test_evaluation_never_augments_with_the_training_collator(setup, tmp_path):
    """Issue 32, item 13: README's snippet passes one augmenting collator for training and evaluation; the training
    dataloader crops and flips, the evaluation and test dataloaders get the same images unaugmented (and score the
    model exactly as a non-augmenting collator does)."""
    from dpt_peft import DPTImageCollator

    model, processor, train, test = setup
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_eval_batch_size=6, report_to=[], use_cpu=True)
    collator = DPTImageCollator(processor, augment=True)
    trainer = DPTTrainer(model, args, train_dataset=train, eval_dataset=test, data_collator=collator)
    plain = ImageBatcher(processor, "image", "label")(list(test.select(range(6))))["pixel_values"]
    for loader in (trainer.get_eval_dataloader(), trainer.get_test_dataloader(test)):
        torch.testing.assert_close(next(iter(loader))["pixel_values"], plain)
    train_pixels = next(iter(trainer.get_train_dataloader()))["pixel_values"]
    unaugmented = ImageBatcher(processor, "image", "label")(list(train))["pixel_values"]
    assert not any(torch.allclose(train_pixels[0], image, atol=1e-3) for image in unaugmented)  # cropped/flipped
    assert trainer.data_collator is collator  # training keeps augmenting
    model.eval()
    metrics = trainer.evaluate()
    reference = DPTTrainer(model, args, eval_dataset=test, data_collator=ImageBatcher(processor, "image", "label"))
    assert metrics["eval_loss"] == pytest.approx(reference.evaluate()["eval_loss"], rel=1e-5)
    augmenting_batcher = TrainerCollator(ImageBatcher(processor, "image", "label", train=True))
    assert augmenting_batcher.for_evaluation().collate.train is False
