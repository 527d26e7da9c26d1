"""The `PeftType` and `TaskType` members of DPT.

PEFT's registry only accepts names that are members of `PeftType`, and `get_peft_model` /
`PeftModel.from_pretrained` only route to a task-specific `PeftModel` subclass for members of `TaskType`.
We add one member to each enum (idempotently, so re-importing is harmless). This touches enum internals,
which is why pyproject.toml bounds the peft version. Registration itself happens in `dpt_peft/__init__.py`.
"""

from __future__ import annotations

import enum

from peft.utils import PeftType, TaskType

PEFT_TYPE_NAME = "DPT"
TASK_TYPE_NAME = "DPT_CLASSIFICATION"


def _add_enum_member(enum_cls: type[enum.Enum], name: str) -> enum.Enum:
    """Add a string member `name` to `enum_cls` unless it already exists."""
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
