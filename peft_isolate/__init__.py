"""peft-isolate: Core Parameter Isolation Fine-Tuning (CPI-FT) as a PEFT method on sparse deltas."""

from .tuner import IsolationConfig, IsolationLayer, IsolationModel

__all__ = ["IsolationConfig", "IsolationLayer", "IsolationModel"]
__version__ = "0.1.0"
