"""Helpers for the tests that run the pipeline: a recipe derived from conftest's `recipe_file`, and its result."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file


def write_lines(path: Path, rows: list[dict]) -> str:
    """A JSONL data file of `rows`; returns its path as a recipe source."""
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def final_adapter(out: Path) -> dict[str, torch.Tensor]:
    """The run's final adapter tensors."""
    return load_file(out / "final" / "adapter_model.safetensors")


def with_changes(recipe_path: Path, out: Path, **changes) -> Path:
    """A copy of the recipe writing to `out`, without baselines, 6-step stages checkpointed every 2 steps."""
    data = yaml.safe_load(recipe_path.read_text())
    data.update(output_dir=str(out), baselines=[], **changes)
    data["stages"] = {**data["stages"], "steps": 6}
    data["training"] = {**data["training"], "save_steps": 2}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(data))
    return path
