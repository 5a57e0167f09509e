"""peft-isolate: Core Parameter Isolation Fine-Tuning (CPI-FT) as a PEFT method on sparse deltas."""

import logging

# peft imports bitsandbytes, whose CPU backend then looks for an optional hub-downloaded kernel and logs a warning
# when it is absent. Nothing here may download (its built-in kernels are used), so that one logger is quiet while
# the first import runs, and its level is restored after.
_bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
_bnb_level = _bnb_logger.level
_bnb_logger.setLevel(logging.ERROR)
try:
    from .plan import jaccard
    from .regions import CoreRegions
    from .selection import find_core_regions
    from .tuner import IsolationConfig, IsolationLayer, IsolationModel
finally:
    _bnb_logger.setLevel(_bnb_level)
    del _bnb_logger, _bnb_level

__all__ = ["CoreRegions", "IsolationConfig", "IsolationLayer", "IsolationModel", "find_core_regions", "jaccard"]
__version__ = "0.1.0"
