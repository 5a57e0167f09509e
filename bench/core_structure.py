"""What a core holds, from a run's real probes: the mass curve `regions.p: auto` reads, and, per granularity
(entries, rows, columns, 64-blocks), the share of each probe's squared update its core captures and the cores'
overlap against chance.

    python bench/core_structure.py bench/_work/seesaw/small/seed0/matched   # a run directory with probes/

Writes bench/results/core_structure.md and .json (command, date, machine, commit).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import provenance
import torch

from peft_isolate.files import save_json, write_atomic
from peft_isolate.plan import chance_matrix, overlap_matrix
from peft_isolate.recipe import Recipe
from peft_isolate.selection import AUTO_GRID, choose_p, find_core_regions, mass_curve
from peft_isolate.sources import DeltaSource, LoraDelta

RESULTS = Path(__file__).parent / "results"
GRANULARITIES = [("element", None), ("row", None), ("column", None), ("block", 64)]


def captured(source: DeltaSource, cores) -> float:
    """The share of the source's squared update that lies on `cores`."""
    held = total = 0.0
    for name in source.shapes():
        d = source.delta(name).flatten().double()
        total += float(d.square().sum())
        held += float(d[cores[name].long()].square().sum())
    return held / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a run directory whose probes/ holds LoRA probes")
    p.add_argument("--p", type=float, nargs="+", default=[0.01, 0.05], help="core sizes to compare granularities at")
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    recipe = Recipe.model_validate(json.loads((args.run / "recipe.json").read_text()))
    from peft_isolate.models import resolve_model

    base = resolve_model(recipe.model)
    sources = {t: LoraDelta(args.run / "probes" / t, base) for t in recipe.tasks}
    curves = {t: mass_curve(s) for t, s in sources.items()}
    choices = {share: choose_p(curves, share) for share in (0.1, 0.25, 0.5)}
    rows = []
    for p_ in args.p:
        for granularity, block in GRANULARITIES:
            cores = {t: find_core_regions(s, p_, granularity=granularity, block=block) for t, s in sources.items()}
            share = {t: captured(sources[t], cores[t]) for t in sources}
            jac, chance = overlap_matrix(cores), chance_matrix(cores)
            pairs = [(i, j) for i in range(len(cores)) for j in range(i + 1, len(cores))]
            rows.append(
                {
                    "p": p_,
                    "granularity": granularity + (f" {block}" if block else ""),
                    "captured": share,
                    "jaccard": [float(jac[i, j]) for i, j in pairs],
                    "chance": [float(chance[i, j]) for i, j in pairs],
                }
            )
            print(rows[-1], flush=True)
    commit = provenance.commit()
    tasks = list(sources)
    lines = [
        "# What a core holds: mass curves and structured cores on real probes",
        "",
        f"Command: `python bench/core_structure.py {' '.join(sys.argv[1:])}`; {time.strftime('%Y-%m-%d')}; "
        f"{platform.processor() or platform.machine()} CPU; commit {commit}; {time.time() - start:.0f} s. "
        f"Probes: {recipe.probe.steps}-step LoRA (rank {recipe.probe.rank}) on {recipe.model}, tasks {tasks}.",
        "",
        "## Share of each probe's squared update held by its top-p entries (the curve `regions.p: auto` reads)",
        "",
        "| p | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for i, p_ in enumerate(AUTO_GRID):
        lines.append(f"| {p_:g} | " + " | ".join(f"{curves[t][i]:.3f}" for t in tasks) + " |")
    lines += ["", "`regions.p: auto` would pick, by the share every core must hold (`regions.mass`):", ""]
    lines += [f"- mass {share:g}: p = {c['p']:g} ({c['rule']})" for share, c in choices.items()]
    pair_names = [f"{tasks[i]}/{tasks[j]}" for i in range(len(tasks)) for j in range(i + 1, len(tasks))]
    lines += [
        "",
        "## Per granularity at equal entry budget: captured update share and overlap (Jaccard, chance in brackets)",
        "",
        "| p | granularity | " + " | ".join(f"captured {t}" for t in tasks) + " | " + " | ".join(pair_names) + " |",
        "|---" * (2 + len(tasks) + len(pair_names)) + "|",
    ]
    for r in rows:
        cells = [f"{r['captured'][t]:.3f}" for t in tasks] + [
            f"{j:.3f} ({c:.3f})" for j, c in zip(r["jaccard"], r["chance"], strict=True)
        ]
        lines.append(f"| {r['p']:g} | {r['granularity']} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    write_atomic(RESULTS / "core_structure.md", lambda path: path.write_text(text))
    save_json(
        {"curves": curves, "grid": list(AUTO_GRID), "choices": choices, "rows": rows}, RESULTS / "core_structure.json"
    )
    print(text)


if __name__ == "__main__":
    main()
