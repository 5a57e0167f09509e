"""The isolation tuner: sparse masked deltas as a PEFT method (`PeftType.ISOLATION`)."""

from peft.utils import register_peft_method
from peft.utils.peft_types import PeftType

from ._peft_type import ensure_peft_type
from .config import IsolationConfig
from .layer import IsolationLayer, Linear
from .model import IsolationModel

__all__ = ["IsolationConfig", "IsolationLayer", "IsolationModel", "Linear"]


def register() -> None:
    """Register the `isolation` method with peft once; calling it again does nothing."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    if PEFT_TYPE_TO_TUNER_MAPPING.get(ensure_peft_type("ISOLATION")) is IsolationModel:
        return
    register_peft_method(name="isolation", config_cls=IsolationConfig, model_cls=IsolationModel, prefix="isolation_")
    assert PeftType.ISOLATION in PEFT_TYPE_TO_TUNER_MAPPING


register()
