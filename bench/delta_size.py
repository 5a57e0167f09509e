"""Sparse-delta file size and load time on SmolLM2-135M: plain int32 indices against the compact gap encoding.

    python bench/delta_size.py                                  # random supports at 1% and 5%
    python bench/delta_size.py --cores run/cores/*.safetensors   # also real cores (element or structured)

For each support an isolation adapter with random values is exported four ways (plain/compact x fp32/bf16) and
read back (`SparseDelta.load`, median of 5). Writes bench/results/delta_size.md (command, date, machine, commit).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import provenance
import torch
from peft import get_peft_model

from peft_isolate import CoreRegions, IsolationConfig
from peft_isolate.export import SparseDelta, export_delta
from peft_isolate.files import write_atomic
from peft_isolate.models import load_model, resolve_model

RESULTS = Path(__file__).parent / "results"
WAYS = [("plain", False, torch.float32), ("plain", False, torch.bfloat16), ("compact", True, torch.float32)]
WAYS += [("compact", True, torch.bfloat16)]


def adapter(model_name: str, out: Path, density: float | None = None, cores: Path | None = None) -> Path:
    model, _ = load_model(model_name)
    config = IsolationConfig(target_modules="all-linear", init_weights=False)
    if cores is not None:
        config = IsolationConfig(target_modules="all-linear", init="regions", regions=str(cores), init_weights=False)
    else:
        config.density = density
    get_peft_model(model, config).save_pretrained(out)
    return out


def measure(adapter_dir: Path, base: Path, work: Path) -> list[dict]:
    rows = []
    for name, compact, dtype in WAYS:
        path = work / f"{name}-{str(dtype)[6:]}.safetensors"
        report = export_delta(adapter_dir, path, dtype, base, compact=compact)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            SparseDelta.load(path)
            times.append(time.perf_counter() - t)
        entries = report["entries"]
        rows.append(
            {
                "way": f"{name} {str(dtype)[6:]}",
                "entries": entries,
                "MB": path.stat().st_size / 1e6,
                "bytes/entry": path.stat().st_size / entries,
                "load s": statistics.median(times),
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.05])
    p.add_argument("--cores", type=Path, nargs="*", default=[])
    args = p.parse_args()
    base = resolve_model(args.model)
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        supports = [(f"random {d:g}", {"density": d}) for d in args.densities]
        supports += [(f"cores {c.name} ({CoreRegions.load(c).granularity})", {"cores": c}) for c in args.cores]
        for label, kw in supports:
            work = Path(tmp) / label.replace(" ", "_")
            rows = measure(adapter(args.model, work / "adapter", **kw), base, work)
            density = rows[0]["entries"] / CoreRegions.load(kw["cores"]).numel if "cores" in kw else kw["density"]
            sections.append((label, density, rows))
            print(label, rows, flush=True)
    commit = provenance.commit()
    lines = [
        "# Sparse-delta file size and load time",
        "",
        f"Command: `python bench/delta_size.py {' '.join(sys.argv[1:])}`; {time.strftime('%Y-%m-%d')}; "
        f"{platform.processor() or platform.machine()} CPU; commit {commit}; model {args.model} (all-linear).",
        "Goals: compact bf16 at most 4 bytes per entry at 1% density and at most 3 at 5%.",
        "",
        "| support | density | file | entries | MB | bytes/entry | load (s, median of 5) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, density, rows in sections:
        for r in rows:
            lines.append(
                f"| {label} | {density:.2%} | {r['way']} | {r['entries']:,} | {r['MB']:.1f} | "
                f"{r['bytes/entry']:.2f} | {r['load s']:.3f} |"
            )
    text = "\n".join(lines) + "\n"
    write_atomic(RESULTS / "delta_size.md", lambda path: path.write_text(text))
    print(text)


if __name__ == "__main__":
    main()
