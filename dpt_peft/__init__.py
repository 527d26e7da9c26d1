"""dpt_peft: Dual-modality Prompt Tuning of CLIP as a Hugging Face PEFT method.

Importing this package registers the "DPT" method with PEFT, so `get_peft_model(clip, DPTConfig(...))`
and `PeftModel.from_pretrained(clip, path)` work; import it before either.
"""

from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import register_peft_method

from .config import DPTConfig
from .integrations.auto import AutoDPTModel
from .integrations.inference import Prediction, predict
from .integrations.pipeline import DPTImageClassificationPipeline, DPTZeroShotPipeline, register_pipeline
from .layer import ClassAwarePromptGenerator, ForwardContext, ParameterKind, TextContextEmbeddings, VisionPromptLayer
from .lora_adapter import LoraClassifierConfig, clip_lora_config
from .lora_classifier import LoraClassifier
from .model import DPTModel
from .outputs import DPTOutput
from .peft_model import DPTPeftModel
from .peft_types import DPT_PEFT_TYPE, PEFT_TYPE_NAME, TASK_TYPE_NAME
from .prototypes import init_visual_prompts_from_prototypes

# As PEFT's own tuners do; guarded because the registry refuses a second registration (re-imports, reloads).
if DPT_PEFT_TYPE not in PEFT_TYPE_TO_CONFIG_MAPPING:
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=DPTConfig, model_cls=DPTModel, prefix="dpt_")
MODEL_TYPE_TO_PEFT_MODEL_MAPPING[TASK_TYPE_NAME] = DPTPeftModel
register_pipeline()  # pipeline("dpt-image-classification", model=...)


def __getattr__(name: str):
    """`DPTTrainer` and `DPTImageCollator` are imported on first use: transformers' Trainer is a heavy import most
    users never need."""
    if name in ("DPTTrainer", "DPTImageCollator"):
        from .integrations import hf_trainer

        return getattr(hf_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AutoDPTModel",
    "ClassAwarePromptGenerator",
    "DPTConfig",
    "DPTImageClassificationPipeline",
    "DPTImageCollator",
    "DPTModel",
    "DPTOutput",
    "DPTPeftModel",
    "DPTTrainer",
    "DPTZeroShotPipeline",
    "ForwardContext",
    "LoraClassifier",
    "LoraClassifierConfig",
    "ParameterKind",
    "Prediction",
    "TextContextEmbeddings",
    "VisionPromptLayer",
    "clip_lora_config",
    "init_visual_prompts_from_prototypes",
    "predict",
]
__version__ = "0.6.0"
