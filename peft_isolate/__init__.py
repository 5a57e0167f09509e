"""peft-isolate: Core Parameter Isolation Fine-Tuning (CPI-FT) as a PEFT method on sparse deltas."""

import logging

# bitsandbytes' CPU backend looks for an optional hub-downloaded kernel at import and logs a warning when it is
# absent; nothing here may download, and its built-in kernels are used instead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .regions import CoreRegions, find_core_regions, jaccard  # noqa: E402
from .tuner import IsolationConfig, IsolationLayer, IsolationModel  # noqa: E402

__all__ = ["CoreRegions", "IsolationConfig", "IsolationLayer", "IsolationModel", "find_core_regions", "jaccard"]
__version__ = "0.1.0"
