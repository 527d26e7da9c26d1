"""What defines a training run: the settings that resuming it, or re-using its finished output, requires unchanged
(run.json and every checkpoint record them; `run_dir` compares them)."""

from __future__ import annotations

from collections.abc import Iterable

from ..config import DPTConfig

# Arguments that may differ between a run and its resumption.
RESUMABLE = (
    "resume_from_checkpoint",
    "overwrite_output_dir",
    "push_to_hub",
    "hub_model_id",
    "base_model_id",
    "report_to",
    "torch_compile",
    "verbose",
    "dataloader_num_workers",
    "gradient_checkpointing",
    "eval_strategy",  # its effect is eval_every's
)
# Settings added since 0.5 and their values that leave a run as 0.5 trained it (TrainArguments and DPTConfig).
OFF_SINCE_0_5 = {"prompt_averaging": "none"} | dict.fromkeys(
    (
        "prompt_averaging_mean",
        "prompt_averaging_std",
        "consistency_weights",
        "consistency_templates",
        "zero_shot_ensemble",
    )
)


def run_identity(arguments: dict, unused: Iterable[str], config: DPTConfig | None, config_flags: Iterable[str]) -> dict:
    """The run's `arguments` but the resumable and `unused` ones, and its DPTConfig's class names and user-set
    fields. A setting added since 0.5 is recorded only when on (`OFF_SINCE_0_5`), so a run of 0.5 resumes, and a
    finished grid run is reused, under this version."""
    left_out = (*RESUMABLE, *unused)
    identity = {k: v for k, v in arguments.items() if k not in left_out and not _off_since_0_5(k, v)}
    if config is not None:
        values = {k: getattr(config, k) for k in ("class_names", *config_flags)}
        identity["dpt_config"] = {k: v for k, v in values.items() if not _off_since_0_5(k, v)}
    return identity


def _off_since_0_5(name: str, value: object) -> bool:
    return name in OFF_SINCE_0_5 and value == OFF_SINCE_0_5[name]
