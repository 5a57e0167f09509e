"""How a core region spreads over its weight matrices: the share of rows and columns it touches, and the share
of its entries each kind of module holds. A low-rank probe's top-p entries crowd into the rows and columns where
its factors are large; a sparse probe's spread over the whole matrix. Writes bench/results/core_spread.md.

    python bench/core_spread.py bench/_work/seesaw/small/seed0/main/cores/*.safetensors \\
        bench/_work/seesaw/small/seed0/ablation-probe_sparse/cores/*.safetensors
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from peft_isolate.files import write_atomic
from peft_isolate.regions import CoreRegions


def spread(core: CoreRegions) -> tuple[float, float, dict[str, float]]:
    """Rows touched / rows, columns touched / columns (over the 2-D weights) and each module kind's share."""
    rows = cols = row_total = col_total = 0
    kinds: Counter[str] = Counter()
    for name, idx in core.indices.items():
        shape = core.shapes[name]
        kinds[name.split(".")[-2]] += idx.numel()
        if len(shape) != 2 or not idx.numel():
            continue
        idx = idx.long()
        rows += (idx // shape[1]).unique().numel()
        cols += (idx % shape[1]).unique().numel()
        row_total, col_total = row_total + shape[0], col_total + shape[1]
    total = max(sum(kinds.values()), 1)
    return rows / max(row_total, 1), cols / max(col_total, 1), {k: n / total for k, n in kinds.most_common()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cores", nargs="+", type=Path, help="core-regions files")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "core_spread.md")
    args = p.parse_args()
    lines = [
        "| core (run/cores/task) | entries | rows touched | columns touched | largest module shares |",
        "|---|---:|---:|---:|---|",
    ]
    for path in args.cores:
        core = CoreRegions.load(path)
        rows, cols, kinds = spread(core)
        shares = ", ".join(f"{k} {v:.2f}" for k, v in list(kinds.items())[:3])
        lines.append(f"| {'/'.join(path.parts[-3:])} | {core.size} | {rows:.2f} | {cols:.2f} | {shares} |")
    text = "\n".join(lines) + "\n"
    write_atomic(args.out, lambda f: f.write_text(text))
    print(text)


if __name__ == "__main__":
    main()
