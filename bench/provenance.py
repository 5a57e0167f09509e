"""Where a benchmark's figures come from: the commit and the device, written next to every table."""

from __future__ import annotations

import contextlib
import os
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


def commit() -> str:
    """The short hash of the checkout the benchmark runs from."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def device() -> str:
    """The GPU's name, or the CPU machine's."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = cpu_model()
    return f"CPU ({os.cpu_count()} cores, {model})" if model else f"CPU ({os.cpu_count()} cores)"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (empty where there is none): kernels, so rounding, differ by CPU."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def versions() -> str:
    """The versions of the libraries a run's numbers depend on (floating-point results move between releases)."""
    return ", ".join(
        f"{name} {installed_version(name)}" for name in ("torch", "transformers", "peft", "trl", "bitsandbytes")
    )


def installed_version(name: str) -> str:
    """A distribution's version, or "not installed": a GPU machine may lack some, which is said rather than raised."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"
