"""dpt_peft: Dual-modality Prompt Tuning of CLIP as a Hugging Face PEFT method.

Importing this package registers the "DPT" method with PEFT, so `get_peft_model(clip, DPTConfig(...))`
and `PeftModel.from_pretrained(clip, path)` work; import it before either.
"""

from .config import DPTConfig
from .inference import DPTZeroShotPipeline, Prediction, predict
from .layer import ClassAwarePromptGenerator, TextContextEmbeddings, VisionPromptLayer
from .model import DPTModel
from .outputs import DPTOutput
from .peft_model import DPTPeftModel
from .prototypes import init_visual_prompts_from_prototypes
from .registration import register

register()

__all__ = [
    "ClassAwarePromptGenerator",
    "DPTConfig",
    "DPTModel",
    "DPTOutput",
    "DPTPeftModel",
    "DPTZeroShotPipeline",
    "Prediction",
    "TextContextEmbeddings",
    "VisionPromptLayer",
    "init_visual_prompts_from_prototypes",
    "predict",
]
__version__ = "0.1.0"
