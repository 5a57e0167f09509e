"""Adds the `ISOLATION` member to peft's `PeftType` enum, which `register_peft_method` requires.

peft only registers names that are already members of `PeftType`; an out-of-tree method has to add its member first.
This relies on `enum` internals, hence the pin `peft>=0.21,<0.22` and a test that fails loudly if they change.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType


def ensure_peft_type(name: str) -> PeftType:
    """Return `PeftType[name]`, adding it as a member first if peft does not know it (idempotent)."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member
