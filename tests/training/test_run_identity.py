"""A run's identity (run.json, every checkpoint) across versions: the settings added in 0.6 (prompt averaging,
self-consistency, the zero-shot ensemble, LoRA's) enter it only when on, so a run of 0.5 resumes under 0.6 and a
finished grid run is reused; turned on, each is part of it."""

from __future__ import annotations

import pytest

from dpt_peft import DPTConfig
from dpt_peft.training.arguments import TrainArguments

# The keys of a 0.5 identity of the embedded default (recorded from 0.5's run.json).
IDENTITY_0_5 = {
    *("attn_implementation", "augment", "batch_size", "checkpoints_to_keep", "class_names_file", "data_root"),
    *("dataset", "dpt_config", "epochs", "eval_batch_size", "eval_every", "gradient_accumulation_steps"),
    *("guidance_epochs", "image_column", "input_pipeline", "label_column", "method", "min_crop_scale"),
    *("mixed_precision", "model_name_or_path", "momentum", "output_dir", "prototype_max_images", "prototype_method"),
    *("save_best", "seed", "shots", "skip_missing_images", "split_file", "subsample_classes", "task_sampling"),
    *("tasks", "test_split", "text_lr", "text_warmup_epochs", "train_split", "visual_lr", "visual_warmup_epochs"),
    *("warmup_lr", "weight_decay"),
}
CONFIG_0_5 = {
    *("cache_class_features", "class_aware", "class_aware_attention_dim", "class_aware_layer"),
    *("class_aware_loss_weight", "class_aware_num_kv_tokens", "class_aware_top_k", "class_names"),
    *("class_specific_context", "class_token_position", "init_from", "learn_text_context", "num_text_tokens"),
    *("num_visual_tokens", "pad_text_to_context", "prompt_init_std", "text_encoding", "text_init"),
    *("tokenizer_name_or_path", "visual_depth", "visual_prompt_init", "zero_shot_template"),
}


def identity(config_overrides: dict | None = None, **arguments) -> dict:
    args = TrainArguments(dataset="toy-position", report_to="none", output_dir="run", **arguments)
    config = DPTConfig.for_method(args.method, class_names=["left", "right"], **(config_overrides or {}))
    return args.run_identity(config)


@pytest.mark.parametrize("method", ["coop", "dpt"])
def test_a_prompt_run_with_the_new_settings_off_has_the_identity_of_0_5(method):
    found = identity(method=method)
    assert set(found) == IDENTITY_0_5 - {"data_fingerprint"}  # added by setup from the data
    assert set(found["dpt_config"]) == CONFIG_0_5


def test_each_new_setting_turned_on_is_part_of_the_identity():
    found = identity(
        {"consistency_weights": (10, 25, 1), "zero_shot_ensemble": 0.5},
        prompt_averaging="gaussian",
        prompt_averaging_std=1.0,
    )
    assert found["prompt_averaging"] == "gaussian" and found["prompt_averaging_std"] == 1.0
    assert "prompt_averaging_mean" not in found  # its default (None) is the same run whether recorded or not
    assert found["dpt_config"]["consistency_weights"] == (10.0, 25.0, 1.0)
    assert found["dpt_config"]["zero_shot_ensemble"] == 0.5
    assert "consistency_templates" not in found["dpt_config"]  # None: the dataset template, as when absent


def test_a_lora_run_records_its_own_settings():
    found = TrainArguments(dataset="toy-position", method="lora", report_to="none", output_dir="run").run_identity(None)
    assert found["lora_r"] == 2 and "dpt_config" not in found
