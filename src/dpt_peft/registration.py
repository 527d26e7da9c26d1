"""Make PEFT aware of DPT without patching its source.

PEFT's registry only accepts names that are members of ``PeftType``, and ``get_peft_model`` /
``PeftModel.from_pretrained`` only route to a task-specific ``PeftModel`` subclass for members of
``TaskType``. We therefore add one member to each enum (idempotently, so re-importing is harmless) and
register our config, tuner and ``PeftModel`` subclass under them.
"""

from __future__ import annotations

import enum

from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import PeftType, TaskType, register_peft_method

PEFT_TYPE_NAME = "DPT"
TASK_TYPE_NAME = "DPT_CLASSIFICATION"


def _add_enum_member(enum_cls: type[enum.Enum], name: str) -> enum.Enum:
    """Add a string member ``name`` to ``enum_cls`` unless it already exists."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)
    return member


DPT_PEFT_TYPE = _add_enum_member(PeftType, PEFT_TYPE_NAME)
DPT_TASK_TYPE = _add_enum_member(TaskType, TASK_TYPE_NAME)


def register() -> None:
    """Register DPT with PEFT (safe to call more than once)."""
    from .config import DPTConfig
    from .model import DPTModel
    from .peft_model import DPTPeftModel

    if DPT_PEFT_TYPE not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=DPTConfig, model_cls=DPTModel, prefix="dpt_")
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING[TASK_TYPE_NAME] = DPTPeftModel
