"""What every part of the prepared GPU run shares: where it writes, the header of its table, the versions.

Each part is its own process (`python bench/gpu/<part>.py --out DIR [--dry-run]`) that writes one markdown
table, `DIR/<part>.md`, and rewrites it after every result, so a part stopped at its deadline still leaves
what it measured. run.sh gives each part its deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
for path in (REPO / "bench", REPO / "tests", REPO):  # seesaw.py and speed.py; tests/tiny.py for the dry run
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import provenance  # noqa: E402  (bench/, on the path above)

PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "peft-isolate")


# the dry run's model (tests/tiny.py's width: the smallest bitsandbytes' CPU 4-bit kernels take)
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
    max_position_embeddings=512,
)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    out |= {name: provenance.installed_version(name) for name in PACKAGES}
    out["cuda"] = torch.version.cuda or "none"
    out["device"] = provenance.device()
    return out


def header(title: str, args: argparse.Namespace, what: str) -> list[str]:
    """The lines above a part's table: title, date, device, versions, and what was run."""
    v = versions()
    packages = ", ".join(f"{n} {v[n]}" for n in PACKAGES)
    mode = "DRY RUN (CPU, tiny sizes: checks the script, measures nothing)" if args.dry_run else "measured"
    return [
        f"# {title}",
        "",
        f"Date {time.strftime('%Y-%m-%d %H:%M %Z')}, device {v['device']}, CUDA {v['cuda']}, "
        f"python {v['python']}, {packages}. {mode}.",
        "",
        what,
        "",
    ]


def write(path: Path, lines: list[str]) -> None:
    """Write a table atomically (a kill at the deadline leaves the previous version, never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    os.replace(tmp, path)


def save_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder of the part's table (run.sh: $OUT)")
    p.add_argument("--work", type=Path, required=True, help="scratch folder (models, run directories)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script end to end")
    return p


def peak_memory_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f}"
