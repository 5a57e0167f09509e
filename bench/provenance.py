"""Where a benchmark's figures come from: the commit and the device, written next to every table."""

from __future__ import annotations

import subprocess
from importlib.metadata import version

import torch


def commit() -> str:
    """The short hash of the checkout the benchmark runs from."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def device() -> str:
    """The GPU's name, or the CPU machine's."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (2 cores)"


def versions() -> str:
    """The versions of the libraries a run's numbers depend on (floating-point results move between releases)."""
    return ", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "peft", "trl", "bitsandbytes"))
