"""The seesaw benchmark: does CPI-FT beat multi-task and multi-stage SFT, and does it stop forgetting?

Every configuration is one recipe run through `peft-isolate`'s own pipeline (same code path, same budget of
stage optimizer steps for every method), once per seed; this script only builds the recipes and aggregates.

    python bench/seesaw.py --quick                      # `main` at 3 tasks, 1 seed: under 30 min on 2 CPU cores
    python bench/seesaw.py --size small --seeds 0 1 2   # the README's CPU evidence (45 min a seed for `main`)
    python bench/seesaw.py --seeds 0 1 2                # the full size (hours on CPU, minutes on a GPU)
    python bench/seesaw.py --size small --parts main forgetting

Parts: `main` (base, probes = single-task evidence, multi-task, multi-stage random / given, LoRA multi-task,
CPI-FT adapter mode), `matched` (CPI-FT at `--matched-p` against multi-task, LoRA multi-task and multi-task on a
support spread over all weights, each at CPI-FT's stage budget and at its whole budget, probes included),
`dense` (CPI-FT dense mode, fp32 full fine-tuning), `forgetting` (task A then task B:
sequential SFT vs CPI-FT with A's core locked, the paper's Table 2), `ablations` (no fusion, no freezing, tau,
p, sparse probe, cores re-selected between stages, freeze all in dense mode, structured cores, and at `matched`'s
whole budget short probes with larger stages, re-selected cores or sparse probes; `--ablations NAME...` picks
some).
`--quick` runs `main` only unless `--parts` says otherwise. `--eval-items 200` rescores runs already trained on
200 held-out items per task (the first 48 are the small size's). `--task-set K` runs the K-th set of three tasks
that bench/screen.py drew (tasks nobody picked) instead of the seesaw's own; its forgetting part then takes one
ordered pair, the set's first two tasks. `--model` other than smollm2-135m (gemma3-270m, say) runs in its own
directories and section (`small-eval200@gemma3-270m`). Writes bench/results/seesaw.md and seesaw.json, a section
per size, task set and model (then one pooled over the sets of a model, and CPI-FT by stage position per model),
and seesaw_<size>.png; `--report` writes seesaw.md again from seesaw.json alone, training nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import provenance
import torch
from matplotlib.figure import Figure

from peft_isolate.evaluate import plot_scores
from peft_isolate.files import load_json, save_json, write_atomic
from peft_isolate.pipeline import run_pipeline
from peft_isolate.recipe import Recipe, RegionSpec

RESULTS = Path(__file__).parent / "results"
WORK = Path(__file__).parent / "_work" / "seesaw"
SCREENED = RESULTS / "screen.json"  # bench/screen.py's screening and its draw of task sets
DEFAULT_MODEL = "smollm2-135m"
# short answers, different skills and formats, the base model weak on each; the first three are the ones a 40-step
# CPU probe clearly lifts above the majority answer (chain_sum needs the full size's budget; see README)
TASKS = ["number_sequence", "spell_backward", "calendar_arithmetic", "chain_sum"]
GIVEN = [["number_sequence", "chain_sum"], ["spell_backward", "calendar_arithmetic"]]  # numbers vs words
SIZES = {
    # `main` in under 30 min on 2 CPU cores (27 measured): about 390 optimizer steps at 3.3 s plus evaluation
    "quick": dict(tasks=3, train=256, eval=48, probe=30, stage=20, seq=96),
    # the CPU evidence in the README: about 720 steps, 43-55 min a seed for `main`
    "small": dict(tasks=3, train=256, eval=48, probe=40, stage=40, seq=96),
    "full": dict(tasks=4, train=1000, eval=200, probe=200, stage=200, seq=128),
}
STAGED = ["multitask", "multistage_random", "multistage_given"]  # the baselines trained on CPI-FT's support
# the `matched` part: what a user would otherwise run, each at CPI-FT's stage budget (the comparison the other parts
# make) and at its whole budget (probes plus stages): multi-task on CPI-FT's support, LoRA at its trainable count,
# and multi-task on as many entries spread over all weights
MATCHED = [
    f"{b}{budget}" for b in ("multitask", "lora_multitask", "multitask_all_weights") for budget in ("", "_matched")
]
MATCHED_P = 0.05  # the p of `matched` unless --matched-p gives another (1%, auto)
# dense mode trains the whole model (probes and stages are full fine-tunes but for the frozen cores), so it takes
# a full fine-tuning learning rate; the adapter's lr of 1e-3-3e-3 on all weights wrecked the model (2.6 points)
DENSE = {"mode": "dense", "quantization": "none", "probe": {"lr": 5e-5}, "stages": {"lr": 5e-5}}
ABLATIONS = {
    "unchanged": {},  # the reference: CPI-FT as in `main`, by the same code as the ablations beside it
    "no_fusion": {"fusion": {"enabled": False}},
    "no_freezing": {"plan": {"freeze": "none"}},
    "tau_0": {"plan": {"tau": 0.0}},
    "tau_0.5": {"plan": {"tau": 0.5}},
    "p_0.001": {"regions": {"p": 0.001}},
    "p_auto": {"regions": {"p": "auto"}},  # beside `unchanged` (1%) and `element_p0.05`: whether auto earns the default
    # the staged baselines train the union of the cores, which p and the probe method change: beside these
    # variants the baselines run again, on the variant's own cores
    "p_0.05": {"regions": {"p": 0.05}, "baselines": STAGED},
    "probe_sparse": {"probe": {"method": "sparse"}, "baselines": STAGED},
    # sparse probes share one random support, so their cores overlap at its chance level (0.11 for 1% of 5%),
    # which links every task at tau 0.1: tau 0.2 stages them again
    "probe_sparse_tau_0.2": {"probe": {"method": "sparse"}, "plan": {"tau": 0.2}, "baselines": STAGED},
    "reselect": {"stages": {"reselect": True}},  # later groups' cores found again from the previous stage's model
    # every stage also locks the later groups' cores (dense mode only: adapter mode rejects it); varies `dense`,
    # so without the hand-given groups `main` adds for its multistage_given baseline
    "dense_freeze_all": {**DENSE, "plan": {"freeze": "all", "groups": None}},
    # structured cores (whole rows, columns, 64-blocks) at the p that serves element cores best so far, 5%, beside
    # element cores on the same probes (`p_0.05` without its baselines)
    **{f"{g}_p0.05": {"regions": {"p": 0.05, "granularity": g}} for g in ("element", "row", "column")},
    "block64_p0.05": {"regions": {"p": 0.05, "granularity": "block", "block": 64}},
    # larger stages at the same whole budget as `matched`'s CPI-FT (issue #21: what would win it): at the small size
    # a quarter of the probe steps, the rest to the stages, 3 x 10 + 3 x 70 = 3 x 40 + 3 x 40 when there are three
    "short_probes_p0.05": {"regions": {"p": 0.05}, "probe": {"steps": 10}, "stages": {"steps": 70}},
    # the later groups' cores found again from the previous stage's model (it helped at 1%), at `matched`'s p
    "reselect_p0.05": {"regions": {"p": 0.05}, "stages": {"reselect": True}},
    # sparse probes (the variant that led at 48 items) without the staged baselines, to judge against `matched`'s:
    # at tau 0.1 one 40-step stage (160 steps in all), at tau 0.2 three (240, `matched`'s budget)
    "sparse_probes": {"probe": {"method": "sparse"}},
    # rehearsal, past the paper: a quarter of each later stage's examples drawn from the earlier stages' tasks, at
    # `matched`'s p and budget (a first-stage task loses most when later stages train without it)
    "replay_p0.05": {"regions": {"p": 0.05}, "stages": {"replay": 0.25}},
    "sparse_probes_tau_0.2": {"probe": {"method": "sparse"}, "plan": {"tau": 0.2}},
}
# variants of `matched`'s CPI-FT, each judged against `matched`'s baselines on the seeds both ran, its optimizer
# steps beside: what would win the matched comparison (issue #21)
SAME_BUDGET = {
    "short_probes_p0.05": "Larger stages at the same budget",
    "reselect_p0.05": "Cores found again between stages (its re-probes spend more than `matched`'s budget)",
    "sparse_probes": "Sparse probes, one stage (fewer steps than `matched`'s budget)",
    "sparse_probes_tau_0.2": "Sparse probes, staged (tau 0.2: `matched`'s budget)",
    "replay_p0.05": "Earlier stages' tasks replayed (a quarter of each later stage's examples; `matched`'s budget)",
}
RENAMED = {"probe": "single_task (probe)"}  # method ids as the tables name them


def recipe(size: dict, names: list[str], seed: int, out: Path, model: str, **changes) -> Recipe:
    """The benchmark's recipe for the tasks `names`, one seed, with section `changes` merged in."""
    data = {
        "model": model,
        "quantization": "nf4" if torch.cuda.is_available() else "none",
        "tasks": {
            t: {"source": f"reasoning_gym:{t}", "train": size["train"], "eval": size["eval"], "seed": 100 + i}
            for i, t in enumerate(names)
        },
        "probe": {"steps": size["probe"], "lr": 3e-3, "rank": 16},
        "stages": {"steps": size["stage"], "lr": 1e-3, "sample": 1.0},
        "training": {"batch_size": 8, "max_seq_len": size["seq"], "seed": seed, "save_steps": 25},
        "plan": {"seed": seed},
        "baselines": [],
        "eval": {"max_new_tokens": size.get("new_tokens", 16), "batch_size": 16, "items": size.get("eval_items")},
        "output_dir": str(out),
    }
    return Recipe.model_validate(_merge(data, changes))


def _merge(data: dict, changes: dict) -> dict:
    """`data` with each section of `changes` merged into its own (a dict) or put in its place."""
    merged = dict(data)
    for section, value in changes.items():
        merged[section] = {**data.get(section, {}), **value} if isinstance(value, dict) else value
    return merged


def drawn_set(k: int) -> tuple[list[str], int]:
    """The k-th task set of bench/screen.py's seeded draw (results/screen.json) and the new tokens its runs generate:
    the most any of its generators was screened with."""
    screened = load_json(SCREENED) if SCREENED.is_file() else {}
    sets = screened.get("sets")
    if not sets or not 0 <= k < len(sets):
        raise SystemExit(f"no task set {k} in {SCREENED}: draw the sets first (python bench/screen.py --sets {k + 1})")
    try:
        return sets[k], max(screened["generators"][t]["new_tokens"] for t in sets[k])
    except KeyError as e:
        raise SystemExit(f"{SCREENED} lacks {e} of set {k}: run bench/screen.py again to record it") from None


def section_name(args: argparse.Namespace) -> str:
    """The results section of a command: `<size>[-eval<N>][-set<K>][@<model>]`, the model only when not the
    default, so every model and task set keeps its own tables and run directories."""
    name = args.size + (f"-eval{args.eval_items}" if args.eval_items else "")
    name += f"-set{args.task_set}" if args.task_set is not None else ""
    return name + (f"@{Path(args.model).name}" if args.model != DEFAULT_MODEL else "")


def work_root(section: str) -> Path:
    """The run directories of a results section (`small`, `small-eval200`, `small-eval200-set1@gemma3-270m`)."""
    name, _, model = section.partition("@")
    size, *rest = name.split("-")
    return WORK / size / next((r for r in rest if r.startswith("set")), "") / model


def runs(
    args, size: dict, tasks: list[str], root: Path, finished: Callable[[dict], None] = lambda out: None
) -> dict[str, dict[str, dict]]:
    """{part/config: {seed: results.json}}, handed to `finished` after each run so far as it got."""
    out: dict[str, dict[str, dict]] = {}
    for seed in args.seeds:
        configs, starts = seed_configs(args, size, tasks, root / f"seed{seed}", seed)
        for name, config in configs.items():
            print(f"== seed {seed}: {name}", flush=True)
            _start_from(Path(config.output_dir), *starts.get(name, []))  # copied now: runs this loop finished count
            result = run_pipeline(config)
            plan = plan_summary(Path(config.output_dir))
            out.setdefault(name, {})[str(seed)] = result | ({"plan": plan} if plan else {})
            finished(out)
    return out


def seed_configs(
    args, size: dict, tasks: list[str], base: Path, seed: int
) -> tuple[dict[str, Recipe], dict[str, list[Path]]]:
    """{part/config: recipe} of one seed's runs under `base`, and per config the runs a new run directory of it
    starts as a copy of (`_start_from`: the first of them finished when it starts)."""
    given = [g for g in ([t for t in g if t in tasks] for g in GIVEN) if g] or None
    pairs = args.pairs or (itertools.permutations(tasks[:3], 2) if args.task_set is None else [tuple(tasks[:2])])
    configs: dict[str, Recipe] = {}
    starts: dict[str, list[Path]] = {}
    main = {"plan": {"seed": seed, "groups": given}}  # the hand-given grouping of multistage_given
    # the runs that train the same probes as `main` can start from each other: the first one run at a new seed
    # trains them, the rest reuse them
    same_probes = [base / f"ablation-{n}" for n in ABLATIONS if _probes(n) == _probes("unchanged")]
    if "main" in args.parts:
        baselines = [*STAGED, "lora_multitask"]
        configs["main"] = recipe(size, tasks, seed, base / "main", args.model, baselines=baselines, **main)
    if "matched" in args.parts:
        # another p than the default's is its own run (`matched-p<p>`), started from the default's: probes reused
        name = matched_name(args.matched_p)
        starts[name] = [run for run in _matched_runs(base) if run.name != name] + [base / "main", *same_probes]
        configs[name] = recipe(
            size,
            tasks,
            seed,
            base / name,
            args.model,
            regions={"p": args.matched_p},
            baselines=args.matched_baselines,
            **main,
        )
    if "dense" in args.parts:
        configs["dense"] = recipe(size, tasks, seed, base / "dense", args.model, **DENSE)
    if "forgetting" in args.parts:
        for a, b in pairs:
            # another core size p varies the default's run: its probes are reused, its cores found again
            p = args.forgetting_p
            out_dir = base / f"forget-{a}-{b}" if p is None else base / f"forget-{a}-{b}-p{p:g}"
            name = f"{a}>{b}" if p is None else f"{a}>{b} (p = {p:g})"
            # the default p's pair run, else a run whose probes of A and B are the same (its other steps redone)
            starts[f"forgetting/{name}"] = [base / f"forget-{a}-{b}", *_matched_runs(base), base / "main", *same_probes]
            configs[f"forgetting/{name}"] = recipe(
                size,
                [a, b],
                seed,
                out_dir,
                args.model,
                regions={} if p is None else {"p": p},
                fusion={"enabled": False},
                plan={"order": "given", "groups": [[a], [b]], "tau": 2.0},
                baselines=["multistage_given"],
                eval={"stages": True},
            )
    if "ablations" in args.parts:
        for name in args.ablations:
            # the runs that train its probes: `dense` for a dense one, `main`'s and `matched`'s for the default
            # probes, and the ablations whose probes are its own (sparse ones too)
            probes = _probes(name)
            first = [base / "dense"] if probes["mode"] == "dense" else []
            first += [base / "main", *_matched_runs(base)] if probes == _probes("unchanged") else []
            siblings = [base / f"ablation-{n}" for n in ABLATIONS if n != name and _probes(n) == probes]
            starts[f"ablation/{name}"] = first + siblings
            changes = _merge(main, ABLATIONS[name])
            configs[f"ablation/{name}"] = recipe(size, tasks, seed, base / f"ablation-{name}", args.model, **changes)
    return configs, starts


def matched_name(p: float | str) -> str:
    """The config and run directory of `matched` at core size `p`: `matched` at the default, else `matched-p<p>`."""
    return "matched" if p == MATCHED_P else f"matched-p{p:g}" if isinstance(p, float) else f"matched-p{p}"


def p_label(config: str) -> str:
    """The p of a `matched` config, as `matched_name` wrote it."""
    return config.removeprefix("matched-p") if config != "matched" else f"{MATCHED_P:g}"


def core_size(config: str) -> str | None:
    """The p label of a config whose CPI-FT differs from `main`'s at most in its element cores' size (`main`, a
    `matched` run, a p ablation), else None; `auto` stays `auto`."""
    if config.split("-")[0] == "matched":
        return p_label(config)
    if config != "main" and not config.startswith("ablation/"):
        return None
    name = "unchanged" if config == "main" else config.removeprefix("ablation/")
    change = ABLATIONS.get(name)
    if change is None or set(change) - {"regions", "baselines"} or granularity(name) != "element":
        return None
    p = change.get("regions", {}).get("p", RegionSpec.model_fields["p"].default)
    return f"{p:g}" if isinstance(p, float) else p


def p_section(runs: dict[str, dict[str, dict]]) -> list[str]:
    """CPI-FT's average at each core size p ({config: {seed: results}}: `matched` runs and p ablations, one run per
    seed and p) and the p that `auto` chose per seed, then the rule for the recipe default: `auto` becomes it only
    if, on the seeds all three ran, it scores at least the better seed mean of 1% and 5%."""
    by_p: dict[str, dict[str, dict]] = {}
    for config, seeds in runs.items():
        if (p := core_size(config)) is not None:
            into = by_p.setdefault(p, {})
            for k, r in seeds.items():  # one run per seed and p: one that records its p (the current pipeline's)
                if k not in into or ("meta" in r and "meta" not in into[k]):
                    into[k] = r
    if len(by_p) < 2:
        return []
    lines = ["", "CPI-FT's average at each core size p (the same probes):", ""]
    lines += ["| p | seeds | avg | per seed | p used per seed |", "|---|---|---|---|---|"]
    for p in sorted(by_p, key=lambda p: (p == "auto", 0.0 if p == "auto" else float(p))):
        ordered = [by_p[p][k] for k in sorted(by_p[p], key=int)]
        avgs = [r["methods"]["cpi_ft"]["avg"] for r in ordered]
        per_seed = ", ".join(f"{100 * a:.1f}" for a in avgs)
        used = ", ".join(f"{r['meta']['core size p']:g}" if "meta" in r else "-" for r in ordered)  # older: none
        lines.append(f"| {p} | {len(ordered)} | {_mean_std(avgs)} | {per_seed} | {used} |")
    compared = ("auto", "0.01", "0.05")
    common = sorted(set.intersection(*(set(by_p.get(p, {})) for p in compared)), key=int)
    if not common:
        return lines
    mean = {p: statistics.mean(by_p[p][k]["methods"]["cpi_ft"]["avg"] for k in common) for p in compared}
    better = max(("0.01", "0.05"), key=mean.get)
    verdict = "earns the recipe default" if mean["auto"] >= mean[better] else "does not earn the recipe default"
    lines += [
        "",
        f"On seeds {', '.join(common)}: `auto` {100 * mean['auto']:.1f} against p = {better} (the better fixed p) "
        f"{100 * mean[better]:.1f}, so `auto` {verdict}.",
    ]
    return lines


def _probes(ablation: str) -> dict:
    """What of an ablation's changes decides its probes: two ablations alike in these train the same ones."""
    return {section: ABLATIONS[ablation].get(section) for section in ("mode", "probe")}


def _matched_runs(base: Path) -> list[Path]:
    """`matched`'s run directories under `base`, the default p's first: each trains the same probes."""
    return [base / "matched", *sorted(base.glob("matched-p*"))]


def _start_from(out_dir: Path, *runs: Path) -> None:
    """A new run directory starts as a copy of the first finished run of `runs` it varies (`main`, `dense`,
    `matched` or an ablation that trains the same probes): the pipeline keeps what its recipe hashes say is the
    same (probes, their scores, often cores and plan) and redoes the rest."""
    done = [run for run in runs if (run / "state.json").exists()]
    if not out_dir.exists() and done:
        shutil.copytree(done[0], out_dir)


def merged(saved: dict, name: str, size: dict, out: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """This invocation's runs on top of those already in seesaw.json for the same size, so the parts, seeds and
    baselines can be run one invocation at a time and the report shows them all."""
    entry = saved["sizes"].get(name, {})
    runs = entry.get("runs", {}) if entry.get("size") == size else {}
    runs = {config: dict(seeds) for config, seeds in runs.items()}
    for config, seeds in out.items():
        into = runs.setdefault(config, {})
        for seed, result in seeds.items():
            into[seed] = merged_run(into.get(seed), result)
    return runs


def merged_run(old: dict | None, new: dict) -> dict:
    """`new`, keeping the methods of `old` (the same config and seed, so the same recipe) it did not run: a
    baseline added in a later session joins its seed's run instead of dropping the others. CPU training is not
    bit-reproducible across sessions, so `meta["kept"]` names the methods that come from the earlier training."""
    kept = sorted(set(old["methods"]) - set(new["methods"])) if old else []
    if not kept:
        return new
    steps = {**old.get("meta", {}).get("optimizer steps", {}), **new.get("meta", {}).get("optimizer steps", {})}
    meta = {**old.get("meta", {}), **new.get("meta", {}), "optimizer steps": steps, "kept": kept}
    return {**old, **new, "methods": {**old["methods"], **new["methods"]}, "meta": meta}


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def main_table(seeds: list[dict], rename: dict[str, str] | None = None) -> tuple[list[str], dict[str, dict]]:
    """Per method and task the per-seed scores (and exact matches), method ids renamed."""
    rename = rename or {}
    table: dict[str, dict] = {}
    for results in seeds:
        for method, entry in results["methods"].items():
            if "@" in method:
                continue
            row = table.setdefault(rename.get(method, method), {"tasks": {}, "exact": {}, "avg": []})
            for task, score in entry["tasks"].items():
                row["tasks"].setdefault(task, []).append(score)
                row["exact"].setdefault(task, []).append(entry["exact"][task])
            row["avg"].append(entry["avg"])
    tasks = list(seeds[0]["majority"])
    return tasks, table


def report(name: str, entry: dict) -> tuple[list[str], dict]:
    """One size's section of seesaw.md from its runs, and the aggregate (seed means) the goals are checked on."""
    runs = entry["runs"]
    seeds_of = {config: sorted(seeds, key=int) for config, seeds in runs.items()}
    lines = [
        f"## Size {name}",
        "",
        f"Last command: `{entry['command']}` ({entry['minutes']:.0f} min; the tables also hold the earlier runs of "
        f"this size), {entry['size']}, model {entry.get('model', DEFAULT_MODEL)}, "
        f"tasks {entry.get('tasks', TASKS[: entry['size']['tasks']])}, device "
        f"{entry['device']}, {entry['date']}"
        + (f", commit {entry['commit']}" if "commit" in entry else "")
        + (f", {entry['versions']}" if "versions" in entry else "")
        + ". Seeds per configuration: "
        + ", ".join(f"{config} {seeds}" for config, seeds in seeds_of.items())
        + ". Scores in points (generator's scorer x 100; exact match in brackets), mean ± std over seeds.",
        "",
    ]
    out = {config: [seeds[k] for k in seeds_of[config]] for config, seeds in runs.items()}
    aggregate = {}
    if "main" in out or "dense" in out:
        seeds = out.get("main", []) + [
            {**r, "methods": {"cpi_ft_dense": r["methods"]["cpi_ft"]}} for r in out.get("dense", [])
        ]
        section, aggregate["methods"] = methods_section("### Methods", seeds)
        lines += section + margins_section(out.get("main", []) or seeds)
        majority = seeds[0]["majority"]
        plot_scores({"methods": aggregate["methods"], "majority": majority}, RESULTS / f"seesaw_{name}.png")
    matched = {c: out[c] for c in sorted(out) if c.split("-")[0] == "matched"}  # one run per core size p
    for config in matched:
        budgets = "`_matched`: CPI-FT's probes + stages; the others: its stages"
        title = f"### Compute-matched baselines, CPI-FT at p = {p_label(config)} ({budgets})"
        section, methods = methods_section(title, out[config])
        steps = out[config][0].get("meta", {}).get("optimizer steps", {})
        lines += ["", *section, *margins_section(out[config])]
        lines += ["", f"Optimizer steps (seed {seeds_of[config][0]}): " + json.dumps(steps)]
        kept = {k: runs[config][k].get("meta", {}).get("kept") for k in seeds_of[config]}
        lines += [f"Seed {k}: {', '.join(m)} from an earlier training of the same recipe" for k, m in kept.items() if m]
        scored: dict[str, list[str]] = {}  # method (as the table names it) -> the seeds that ran it
        for k in seeds_of[config]:
            for m in runs[config][k]["methods"]:
                scored.setdefault(RENAMED.get(m, m), []).append(k)
        partial = {m: k for m, k in scored.items() if "@" not in m and len(k) < len(seeds_of[config])}
        lines += [
            f"{m}: seeds {', '.join(k)} so far: its margin is over those, and it is left out of the goals"
            for m, k in partial.items()
        ]
        lines += goals({"methods": {m: v for m, v in methods.items() if m not in partial}})
    lines += p_section(runs)
    forgetting = {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith("forgetting/")}
    if forgetting:
        section, aggregate["forgetting"] = forgetting_section(forgetting)
        lines += section
    for change in ABLATIONS:  # an ablation that trains its own baselines gets its own table and goals
        seeds = out.get(f"ablation/{change}", [])
        if seeds and set(STAGED) <= set(seeds[0]["methods"]):
            section, methods = methods_section(f"### Methods with `{change}` (baselines on its support)", seeds)
            lines += ["", *section, *goals({"methods": methods})]
    ablations = {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith("ablation/")}
    if ablations:
        lines += ["", "### Ablations (CPI-FT average)", "", "| change | avg |", "|---|---|"]
        for change, seeds in ablations.items():
            lines.append(f"| cpi_ft:{change} | {_mean_std([r['methods']['cpi_ft']['avg'] for r in seeds])} |")
        lines += overlap_section(work_root(name), {k: runs[f"ablation/{k}"] for k in ablations})
        lines += structured_section({k: runs[f"ablation/{k}"] for k in ablations})
    for variant in SAME_BUDGET:
        lines += same_budget_section(runs, variant)
    return lines + goals(aggregate), aggregate


FORGETTING = ("multistage_given", "cpi_ft")  # sequential SFT, and CPI-FT with A's core locked


def forgetting_drops(pair: str, seeds: list[dict]) -> dict[str, list[float]]:
    """Per seed, how far task A of `pair` ("A>B") fell from after its own stage to after B's: sequential SFT
    (`multistage_given`) and CPI-FT with A's core locked."""
    a = pair.split(">")[0]
    return {m: [r["methods"][f"{m}@0"]["tasks"][a] - r["methods"][m]["tasks"][a] for r in seeds] for m in FORGETTING}


def forgetting_items(pair: str, result: dict) -> dict[str, np.ndarray] | None:
    """One seed's drop of task A of `pair` per eval item ({A: items x FORGETTING}), None for a run that kept no
    per-item scores."""
    a, methods = pair.split(">")[0], result["methods"]
    if not all(methods[k].get("items") for m in FORGETTING for k in (m, f"{m}@0")):
        return None
    drops = [np.subtract(methods[f"{m}@0"]["items"][a], methods[m]["items"][a]) for m in FORGETTING]
    return {a: np.stack(drops, axis=1)}


def forgetting_rows(pairs: dict[str, list[dict]], pool: bool = False) -> dict[str, dict]:
    """Per ordered pair ({"A>B" label: one result per seed}), with `pool` also pooled over every pair x seed run at
    the same core size p (a label's "(p = ...)") where there are several: A's drops per run and their means
    (FORGETTING's methods), CPI-FT's drop minus sequential SFT's and the forgetting cut (1 - CPI-FT's drop /
    sequential SFT's), each as (value, 95% low, high) with a bootstrap interval over runs and A's eval items where
    every run kept them (else None)."""
    runs = {
        pair: (forgetting_drops(pair, seeds), [forgetting_items(pair, r) for r in seeds])
        for pair, seeds in pairs.items()
    }
    if pool:
        by_p: dict[str, list[str]] = {}  # a pair pools with those at its core size p
        for pair in runs:
            by_p.setdefault(" ".join(["pooled", *re.findall(r"\(p = [^)]*\)", pair)]), []).append(pair)
        for name, members in by_p.items():
            if len(members) > 1:
                pooled = {m: [d for pair in members for d in runs[pair][0][m]] for m in FORGETTING}
                runs[name] = (pooled, [i for pair in members for i in runs[pair][1]])
    rows = {}
    for pair, (drops, items) in runs.items():
        means = {m: statistics.mean(d) for m, d in drops.items()}
        sequential, isolated = means["multistage_given"], means["cpi_ft"]
        difference = (isolated - sequential, None, None)
        cut = (1 - isolated / sequential, None, None) if sequential > 0 else None
        if all(i is not None for i in items):
            _, replicates = bootstrap_means(items)
            difference = (difference[0], *np.percentile(replicates[:, 1] - replicates[:, 0], [2.5, 97.5]))
            if cut and (replicates[:, 0] > 0).all():  # else a replicate with no sequential drop has no cut
                cut = (cut[0], *np.percentile(1 - replicates[:, 1] / replicates[:, 0], [2.5, 97.5]))
        rows[pair] = {"drops": drops, "means": means, "difference": difference, "cut": cut}
    return rows


def forgetting_section(
    pairs: dict[str, list[dict]], pool: bool = False
) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The forgetting table of `forgetting_rows` (means ± std, intervals, per run and a sign count), and the mean
    drops ({label: {method: mean}}) the goals are checked on."""
    lines = [
        "",
        "### Forgetting: the drop of A after training B (points; lower is better)",
        "",
        "Intervals: 95% bootstrap over runs and A's eval items, paired; a run scored before per-item scores were kept "
        "has none.",
        "",
        "| A > B | runs | sequential SFT | CPI-FT (A's core locked) | CPI-FT minus sequential | per run "
        "| forgetting cut | CPI-FT forgot less in |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = forgetting_rows(pairs, pool)
    for pair, row in rows.items():
        drops, (value, low, high) = row["drops"], row["difference"]
        difference = f"{100 * value:+.1f}" + ("" if low is None else f" [{100 * low:+.1f}, {100 * high:+.1f}]")
        if row["cut"] is None:
            cut = "none to cut"
        else:
            value, low, high = row["cut"]
            cut = f"{100 * value:.0f}%" + (f" [{100 * low:.0f}%, {100 * high:.0f}%]" if low is not None else "")
            if low is None and row["difference"][1] is not None:
                cut += " (no interval: sequential SFT's drop reaches 0)"
        per_run = [i - s for s, i in zip(drops["multistage_given"], drops["cpi_ft"], strict=True)]
        lines.append(
            f"| {pair} | {len(per_run)} | {_mean_std(drops['multistage_given'])} | {_mean_std(drops['cpi_ft'])} "
            f"| {difference} | {', '.join(f'{100 * d:+.1f}' for d in per_run)} | {cut} "
            f"| {sum(d < 0 for d in per_run)} of {len(per_run)} |"
        )
    return lines, {pair: row["means"] for pair, row in rows.items()}


def overlap_section(root: Path, ablations: dict[str, dict[str, dict]]) -> list[str]:
    """Per p / granularity ablation ({change: {seed: result}}), how its cores overlap (mean pairwise Jaccard
    against its chance level) and how many stages the plan made: structure may link tasks more often. Read from
    the plan each result keeps (`plan_summary`), else from its run's plan.json under `root` (runs saved before
    results kept their plan: gone with the run directory, such a run is left out)."""
    rows = []
    for change, seeds in ablations.items():
        plans = [
            result.get("plan") or plan_summary(root / f"seed{k}" / f"ablation-{change}") for k, result in seeds.items()
        ]
        plans = [p for p in plans if p]
        if not plans or not (change.startswith("p_") or "_p0" in change):
            continue
        pairs = [
            (p["jaccard"][i][j], p["chance"][i][j], len(p["stages"]))
            for p in plans
            for i, j in itertools.combinations(range(len(p["tasks"])), 2)
        ]
        jaccard, chance = statistics.mean(j for j, _, _ in pairs), statistics.mean(c for _, c, _ in pairs)
        stages = sorted({n for _, _, n in pairs})
        rows.append(f"| {change} | {jaccard:.3f} | {chance:.3f} | {', '.join(map(str, stages))} |")
    if not rows:
        return []
    head = ["", "Core overlap (mean pairwise Jaccard over seeds) and stages:", ""]
    return head + ["| change | Jaccard | chance | stages |", "|---|---|---|---|", *rows]


def plan_summary(run_dir: Path) -> dict | None:
    """What seesaw.md reports of a run's plan (tasks, core overlap, stages), kept with its results."""
    path = run_dir / "plan.json"
    plan = load_json(path) if path.is_file() else None
    return {k: plan[k] for k in ("tasks", "jaccard", "chance", "stages")} if plan else None


def granularity(ablation: str) -> str:
    """The core granularity an ablation sets (`element` unless its regions say otherwise)."""
    return ABLATIONS.get(ablation, {}).get("regions", {}).get("granularity", "element")


def structured_section(ablations: dict[str, dict[str, dict]], element: str = "element_p0.05") -> list[str]:
    """Structured cores against element cores at the same p, probes and eval items ({ablation: {seed: results}}):
    CPI-FT's per-task and average scores (seed means) and average per seed, its paired margin over element cores
    (95% bootstrap interval over the seeds both ran and their items), and whether its mean lies within element
    cores' seed spread (mean - std), the goal."""
    reference = ablations.get(element, {})
    structured = [c for c in ablations if c != element and granularity(c) != "element"]
    if not reference or not structured:
        return []
    tasks = list(next(iter(reference.values()))["majority"])  # main_table's order

    def scores(change: str) -> tuple[list[str], list[float], str]:
        seeds = sorted(ablations[change], key=int)
        _, table = main_table([ablations[change][k] for k in seeds])
        cpi = table["cpi_ft"]
        cells = [f"{100 * statistics.mean(cpi['tasks'][t]):.1f}" for t in tasks]
        row = f"| {change} | {len(seeds)} | {' | '.join(cells)} | {_mean_std(cpi['avg'])} | "
        return seeds, cpi["avg"], row + ", ".join(f"{100 * a:.1f}" for a in cpi["avg"])

    _, avgs, row = scores(element)
    floor = statistics.mean(avgs) - (statistics.stdev(avgs) if len(avgs) > 1 else 0.0)
    lines = [
        "",
        f"Structured cores against element cores on the same probes and eval items (`{element}`), points:",
        "",
        f"| cores | seeds | {' | '.join(tasks)} | avg | per seed | margin over element | 95% interval | within "
        "element's seed spread |",
        "|---" * (len(tasks) + 7) + "|",
        row + " | | | |",
    ]
    for change in structured:
        seeds, avgs, row = scores(change)
        both = [k for k in seeds if k in reference]
        pairs = [(ablations[change][k], reference[k]) for k in both]
        pairs = [(a["methods"]["cpi_ft"]["items"], b["methods"]["cpi_ft"]["items"]) for a, b in pairs]
        margin, low, high = bootstrap_margin(pairs) if pairs else (float("nan"),) * 3
        inside = "yes" if statistics.mean(avgs) >= floor else "no"
        paired = f"{100 * margin:+.1f} (seeds {', '.join(both)}) | [{100 * low:+.1f}, {100 * high:+.1f}]"
        lines.append(f"{row} | {paired} | {inside} |")
    return lines


def same_budget_section(runs: dict[str, dict[str, dict]], variant: str) -> list[str]:
    """The CPI-FT of ablation `variant` (one of SAME_BUDGET) against `matched`'s baselines and its CPI-FT on the
    seeds both ran: whether the variant wins the matched comparison."""
    ablation, matched = runs.get(f"ablation/{variant}", {}), runs.get("matched", {})
    seeds = sorted(set(ablation) & set(matched), key=int)
    if not seeds:
        return []
    combined = []
    for k in seeds:
        methods = {("cpi_ft (`matched`)" if m == "cpi_ft" else m): r for m, r in matched[k]["methods"].items()}
        combined.append({"methods": {**methods, "cpi_ft": ablation[k]["methods"]["cpi_ft"]}})
    steps = {k: ablation[k].get("meta", {}).get("optimizer steps", {}).get("cpi_ft parts") for k in seeds}
    avg = _mean_std([r["methods"]["cpi_ft"]["avg"] for r in combined])
    on = f"seed{'s' * (len(seeds) > 1)} {', '.join(seeds)}"
    lines = ["", f"### {SAME_BUDGET[variant]} (`{variant}` against `matched`, {on})"]
    lines += ["", f"CPI-FT `{variant}`: {avg}; its optimizer steps per seed: {json.dumps(steps)}."]
    return lines + margins_section(combined)


def methods_section(title: str, seeds: list[dict]) -> tuple[list[str], dict]:
    """A methods x tasks table (mean ± std over seeds, exact match in brackets) and the seed means."""
    tasks, table = main_table(seeds, RENAMED)
    majority = seeds[0]["majority"]
    lines = [title, "", "| method | " + " | ".join(tasks) + " | avg |", "|---" * (len(tasks) + 2) + "|"]
    lines.append("| majority answer | " + " | ".join(f"{100 * majority[t]:.1f}" for t in tasks) + " | |")
    for method, row in table.items():
        cells = [
            f"{_mean_std(row['tasks'][t])} ({_mean_std(row['exact'][t])})" if t in row["tasks"] else "-" for t in tasks
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {_mean_std(row['avg'])} |")
    means = {
        m: {"tasks": {t: statistics.mean(v) for t, v in row["tasks"].items()}, "avg": statistics.mean(row["avg"])}
        for m, row in table.items()
    }
    return lines, means


def bootstrap_means(
    per_seed: list[dict[str, np.ndarray]], reps: int = 2000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The mean over tasks, then over seeds, of per-item values (per seed {task: items, or items x columns}) and
    `reps` bootstrap replicates of it: each draws the seeds with replacement and, within each, the items per task
    with replacement, the same items for every column (paired)."""
    rng = np.random.default_rng(seed)
    estimate = np.mean([np.mean([d.mean(axis=0) for d in s.values()], axis=0) for s in per_seed], axis=0)
    replicates = np.empty((reps, *np.shape(estimate)))
    for r in range(reps):
        chosen = rng.integers(0, len(per_seed), len(per_seed))
        replicates[r] = np.mean(
            [
                np.mean([d[rng.integers(0, len(d), len(d))].mean(axis=0) for d in per_seed[k].values()], axis=0)
                for k in chosen
            ],
            axis=0,
        )
    return estimate, replicates


def bootstrap_margin(pairs: list[tuple[dict, dict]], reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """CPI-FT's margin over a baseline (mean over tasks of the score difference, then over seeds) and its 95%
    bootstrap interval (`bootstrap_means`, paired: both methods on the same items). `pairs` holds, per seed, the two
    methods' per-item scores {task: [score per item]}."""
    diffs = [{t: np.asarray(a[t]) - np.asarray(b[t]) for t in a} for a, b in pairs]
    margin, replicates = bootstrap_means(diffs, reps, seed)
    low, high = np.percentile(replicates, [2.5, 97.5])
    return float(margin), float(low), float(high)


def margin_rows(seeds: list[dict], method: str = "cpi_ft") -> list[dict]:
    """`method`'s margin over each other method scored on the same items in the seeds (or set x seed runs) it ran:
    {baseline, runs (how many), of (of how many), margin, low, high (95% bootstrap over runs and items), per_run}."""
    if not seeds[0]["methods"].get(method, {}).get("items"):
        return []
    rows = []
    for other in dict.fromkeys(m for r in seeds for m in r["methods"]):
        if other == method or "@" in other or other == "base":
            continue
        scored = [r for r in seeds if other in r["methods"]]  # a baseline added later: the runs it has so far
        pairs = [(r["methods"][method].get("items"), r["methods"][other].get("items")) for r in scored]
        if not all(a and b and set(a) == set(b) for a, b in pairs):
            continue  # single-task rows, or a seed scored before per-item scores were kept
        margin, low, high = bootstrap_margin(pairs)
        per_run = [r["methods"][method]["avg"] - r["methods"][other]["avg"] for r in scored]
        rows.append(
            dict(baseline=other, runs=len(scored), of=len(seeds), margin=margin, low=low, high=high, per_run=per_run)
        )
    return rows


def margins_section(seeds: list[dict], method: str = "cpi_ft") -> list[str]:
    """A table of `margin_rows`: mean, per run, 95% interval, whether the interval leaves out zero, and a sign
    count (in how many runs `method`'s average beats the other's)."""
    rows = margin_rows(seeds, method)
    if not rows:
        return []
    lines = [
        "",
        f"Margins of {method} over each baseline, in points (95% bootstrap interval over seeds and eval items, "
        "paired):",
        "",
        "| baseline | margin | per seed | 95% interval | interval excludes 0 | ahead in |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        low, high = row["low"], row["high"]
        verdict = "yes, CPI-FT ahead" if low > 0 else "yes, CPI-FT behind" if high < 0 else "no"
        name = row["baseline"] if row["runs"] == row["of"] else f"{row['baseline']} ({row['runs']} of {row['of']} runs)"
        lines.append(
            f"| {name} | {100 * row['margin']:+.1f} | {', '.join(f'{100 * m:+.1f}' for m in row['per_run'])} "
            f"| [{100 * low:+.1f}, {100 * high:+.1f}] | {verdict} | {sum(m > 0 for m in row['per_run'])} of "
            f"{row['runs']} |"
        )
    return lines


def goals(aggregate: dict) -> list[str]:
    """The benchmark's goals checked on the seed means: what was measured and whether it is met."""
    rows = []
    methods = aggregate.get("methods", {})
    cpi = methods.get("cpi_ft")
    if cpi and "multitask" in methods:
        rows.append(("CPI-FT average >= multi-task average", cpi["avg"] - methods["multitask"]["avg"]))
    for suffix, budget in (("", ""), ("_matched", " at matched compute")):  # each budget its own bar
        names = [m + suffix for m in ("multistage_random", "multistage_given")]
        staged = [methods[m]["avg"] for m in names if m in methods]
        if cpi and staged:
            rows.append((f"CPI-FT average >= best multi-stage average{budget} + 5", cpi["avg"] - max(staged) - 0.05))
    for baseline in ("multitask_matched", "lora_multitask_matched", "multitask_all_weights_matched"):
        if cpi and baseline in methods:
            rows.append((f"CPI-FT average >= {baseline} average", cpi["avg"] - methods[baseline]["avg"]))
    single = methods.get(RENAMED["probe"])
    if cpi and single:
        worst = min(cpi["tasks"][t] - single["tasks"][t] + 0.02 for t in single["tasks"])
        rows.append(("no task more than 2 points under its single-task score", worst))
    lines = [f"| {goal} | {100 * margin:+.1f} points | {'yes' if margin >= 0 else 'no'} |" for goal, margin in rows]
    for pair, drops in aggregate.get("forgetting", {}).items():
        sequential, isolated = drops["multistage_given"], drops["cpi_ft"]
        if sequential <= 0:
            lines.append(
                f"| forgetting cut >= 70% ({pair}) | none to cut: sequential SFT's drop {100 * sequential:+.1f} | - |"
            )
            continue
        cut = 1 - isolated / sequential
        lines.append(f"| forgetting cut >= 70% ({pair}) | cut {100 * cut:.0f}% | {'yes' if cut >= 0.7 else 'no'} |")
    if not lines:
        return []
    return [
        "",
        "### Goals (on the seed means above)",
        "",
        "| goal | margin to the goal | met |",
        "|---|---|---|",
        *lines,
    ]


def in_seed_order(seeds: dict[str, dict]) -> list[dict]:
    """One configuration's results ({seed: results}) in seed order."""
    return [seeds[k] for k in sorted(seeds, key=int)]


def set_runs(sets: dict[str, dict], config: str) -> dict[str, list[dict]]:
    """Per task-set section ({section: entry}) that ran `config`, its results in seed order."""
    return {name: in_seed_order(entry["runs"][config]) for name, entry in sets.items() if config in entry["runs"]}


def set_forgetting(sets: dict[str, dict]) -> dict[str, list[dict]]:
    """The task sets' forgetting pairs ({"A>B (section)": results in seed order})."""
    return {
        f"{config.split('/', 1)[1]} ({name})": in_seed_order(seeds)
        for name, entry in sets.items()
        for config, seeds in entry["runs"].items()
        if config.startswith("forgetting/")
    }


def plot_task_sets(sets: dict[str, dict], path: Path) -> Path | None:
    """The task sets nobody picked as a forest plot: CPI-FT's margin over each baseline of `matched` per set and
    pooled (left), and its forgetting minus sequential SFT's per pair and pooled (right), with 95% bootstrap
    intervals (over runs and eval items); left of zero is CPI-FT behind on the left panel and forgetting less on
    the right. None with fewer than two sets."""
    matched = set_runs(sets, "matched")
    if len(matched) < 2:
        return None
    groups = {**dict(sorted(matched.items())), "pooled": [r for seeds in matched.values() for r in seeds]}
    scored = [(name, row) for name, seeds in groups.items() for row in margin_rows(seeds) if row["baseline"] != "probe"]
    order = list(dict.fromkeys(row["baseline"] for _, row in scored))  # a baseline's sets and pool together
    margins = [  # (label, (value, low, high)) per row, as the forgetting rows hold their difference
        (f"{row['baseline']} · {name.rsplit('-', 1)[-1]} ({row['runs']})", (row["margin"], row["low"], row["high"]))
        for name, row in sorted(scored, key=lambda r: order.index(r[1]["baseline"]))
    ]
    forgetting = [
        (re.sub(r" \([^()]*-(set\d+)\)$", r" · \1", pair) + f" ({len(row['drops']['cpi_ft'])})", row["difference"])
        for pair, row in forgetting_rows(set_forgetting(sets), pool=True).items()
    ]
    panels = [(margins, "CPI-FT's margin (points)"), (forgetting, "CPI-FT's drop minus sequential SFT's (points)")]
    panels = [(rows, label) for rows, label in panels if rows]
    fig = Figure(figsize=(6.5 * len(panels), 0.32 * max(len(rows) for rows, _ in panels) + 1.4))
    for ax, (rows, label) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for y, (_, (value, low, high)) in enumerate(reversed(rows)):
            ax.plot(100 * value, y, "o", color="black" if low is not None else "grey")
            if low is not None:
                ax.hlines(y, 100 * low, 100 * high, color="black")
        ax.axvline(0, color="grey", linestyle="dashed")
        ax.set_yticks(range(len(rows)), [name for name, _ in reversed(rows)], fontsize="small")
        ax.set_xlabel(label)
    fig.suptitle("Task sets nobody picked: 95% bootstrap intervals (runs in brackets)", fontsize="medium")
    fig.tight_layout()
    return write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=120))


def pooled_section(sets: dict[str, dict]) -> list[str]:
    """The task sets' `matched` and forgetting runs pooled ({section: entry}, one size): per baseline CPI-FT's
    margin over every set x seed run (95% bootstrap interval over runs and eval items) and a sign count (in how
    many runs CPI-FT's average beats the baseline's), then the goals on the pooled means, a task per set."""
    matched = set_runs(sets, "matched")
    if len(matched) < 2:
        return []  # one set has its own section
    runs = [r for seeds in matched.values() for r in seeds]
    title = f"## Pooled over {len(matched)} task sets nobody picked ({', '.join(matched)}: {len(runs)} set x seed runs)"
    lines = [title, *margins_section(runs)]
    methods: dict[str, dict] = {}
    for name, seeds in matched.items():
        _, table = main_table(seeds, RENAMED)
        for method, row in table.items():
            pooled = methods.setdefault(method, {"tasks": {}, "avgs": []})
            pooled["tasks"] |= {f"{t} ({name})": statistics.mean(v) for t, v in row["tasks"].items()}
            pooled["avgs"] += row["avg"]
    partial = [m for m, v in methods.items() if len(v["avgs"]) < len(runs)]  # its mean is not over the same runs
    kept = {m: v for m, v in methods.items() if m not in partial}
    aggregate = {"methods": {m: {"tasks": v["tasks"], "avg": statistics.mean(v["avgs"])} for m, v in kept.items()}}
    lines += [f"{m}: {len(methods[m]['avgs'])} of {len(runs)} runs so far, left out of the goals" for m in partial]
    forgetting = set_forgetting(sets)
    if forgetting:
        section, aggregate["forgetting"] = forgetting_section(forgetting, pool=True)
        lines += section
    return lines + goals(aggregate)


def variant_pooled_section(sections: dict[str, dict], variant: str, control: str = "element_p0.05") -> list[str]:
    """The CPI-FT of ablation `variant` pooled over every section (task set, model) and seed that ran it beside
    `control` (the same probes without the change) and `matched` (the baselines): its margin over each with a 95%
    interval over those runs and their items, and a sign count."""
    combined, read = [], []
    for name, entry in sections.items():
        runs = entry["runs"]
        ran, ref, matched = (runs.get(c, {}) for c in (f"ablation/{variant}", f"ablation/{control}", "matched"))
        for seed in sorted(set(ran) & set(ref) & set(matched), key=int):
            baselines = {m: r for m, r in matched[seed]["methods"].items() if m != "cpi_ft"}
            cpi = {"cpi_ft": ran[seed]["methods"]["cpi_ft"], f"cpi_ft ({control})": ref[seed]["methods"]["cpi_ft"]}
            combined.append({"methods": cpi | baselines})
            read.append(f"{name} seed {seed}")
    if len(combined) < 2:
        return []
    title = f"## `{variant}` pooled over {len(combined)} runs ({', '.join(read)})"
    return [
        "",
        title,
        "",
        f"{SAME_BUDGET[variant]}; `{control}`: the same probes without it.",
        *margins_section(combined),
    ]


def stage_position_section(sections: dict[str, dict]) -> list[str]:
    """CPI-FT's score minus its single-task probe's, per task, by the stage that trained it (first, middle, last), over
    every `matched` run of one model ({section: entry}) whose kept plan gives each task a stage of its own; beside
    it the same tasks under multitask_matched, which has no stages: whether the order the plan draws decides which
    task loses, or the task does whatever trains it."""
    rows: dict[str, dict[str, list[float]]] = {}
    read: dict[str, None] = {}  # the sections with such a run, in order
    for name, entry in sections.items():
        for config, seeds in entry["runs"].items():
            if config.split("-")[0] != "matched":
                continue
            for r in seeds.values():
                stages, methods = r.get("plan", {}).get("stages", []), r["methods"]
                if len(stages) < 3 or any(len(s["tasks"]) != 1 for s in stages):
                    continue
                probe = methods["probe"]["tasks"]
                read[name] = None
                for k, stage in enumerate(stages):
                    task = stage["tasks"][0]
                    row = rows.setdefault("first" if k == 0 else "last" if k == len(stages) - 1 else "middle", {})
                    for method in ("cpi_ft", "multitask_matched"):
                        if method in methods:
                            row.setdefault(method, []).append(methods[method]["tasks"][task] - probe[task])
    if not rows:
        return []

    def cell(values: list[float]) -> str:
        if not values:
            return "-"
        return f"{100 * statistics.mean(values):+.1f} ({100 * min(values):+.1f} to {100 * max(values):+.1f})"

    lines = [
        "",
        f"## CPI-FT by stage position ({', '.join(read)})",
        "",
        "Per task, its score minus its single-task probe's, by the stage that trained it (runs whose stages hold one "
        "task each); multitask_matched trains no stages: its column is the same tasks. Mean (lowest to highest), "
        "points:",
        "",
        "| trained in stage | tasks | cpi_ft | multitask_matched |",
        "|---|---|---|---|",
    ]
    for position in ("first", "middle", "last"):
        if position in rows:
            row = rows[position]
            lines.append(
                f"| {position} | {len(row['cpi_ft'])} | {cell(row['cpi_ft'])} "
                f"| {cell(row.get('multitask_matched', []))} |"
            )
    return lines


def overlap_chance_section(sections: dict[str, dict]) -> list[str]:
    """Per `matched` run of one model ({section: entry}) that kept its plan: the pair of tasks whose cores overlap
    most, that Jaccard against the chance level of random cores of the same sizes, and whether the plan linked any
    tasks into one stage: how far the grouping step is from acting at these core sizes."""
    rows, ratios, linked, read = [], [], 0, {}
    for name, entry in sections.items():
        for config, seeds in entry["runs"].items():
            if config.split("-")[0] != "matched":
                continue
            for seed, r in sorted(seeds.items(), key=lambda kv: int(kv[0])):
                plan = r.get("plan")
                if not plan or len(plan.get("tasks", [])) < 2 or "chance" not in plan:
                    continue
                tasks, jac, chance = plan["tasks"], plan["jaccard"], plan["chance"]
                pairs = [(jac[i][j] / chance[i][j], i, j) for i, j in itertools.combinations(range(len(tasks)), 2)]
                ratio, i, j = max(pairs)
                grouped = any(len(stage["tasks"]) > 1 for stage in plan["stages"])
                ratios.append(ratio)
                linked += grouped
                read[name] = None
                rows.append(
                    f"| {name} | {p_label(config)} | {seed} | {tasks[i]}, {tasks[j]} | {jac[i][j]:.4f} "
                    f"| {chance[i][j]:.4f} | {ratio:.2f} | {'yes' if grouped else 'no'} |"
                )
    if not rows:
        return []
    return [
        "",
        f"## Core overlap against chance ({', '.join(read)})",
        "",
        f"Per `matched` run, the two tasks whose cores overlap most (Jaccard) beside the overlap random cores of the "
        f"same sizes reach by chance. Over {len(rows)} runs the highest overlap is {min(ratios):.2f}-"
        f"{max(ratios):.2f}x chance; {linked} of {len(rows)} plans linked two tasks into one stage.",
        "",
        "| section | p | seed | most overlapping cores | Jaccard | chance | x chance | any stage of two tasks |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def task_set_groups(sections: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """The task-set sections ({section: entry}) that pool together: the same size, item count and model."""
    groups: dict[str, dict[str, dict]] = {}
    for name, entry in sections.items():
        if re.search(r"-set\d+", name):
            groups.setdefault(re.sub(r"-set\d+", "", name), {})[name] = entry
    return groups


def write_results(saved: dict) -> None:
    """seesaw.md (a section per size and task set, smallest first, then the sets pooled per size, then CPI-FT by
    stage position per model) and seesaw.json from every section's runs."""
    lines = ["# Seesaw benchmark", ""]
    for name in sorted(saved["sizes"], key=lambda n: (list(SIZES).index(n.split("-")[0]), n)):
        section, saved["sizes"][name]["aggregate"] = report(name, saved["sizes"][name])
        lines += [*section, ""]
    for group, entries in sorted(task_set_groups(saved["sizes"]).items()):
        lines += [*pooled_section(entries), ""]
        plot_task_sets(entries, RESULTS / f"seesaw_sets_{group.replace('@', '_')}.png")
    lines += [*variant_pooled_section(saved["sizes"], "replay_p0.05"), ""]  # tried on several sets and models
    models: dict[str, dict[str, dict]] = {}
    for name, entry in saved["sizes"].items():
        models.setdefault(entry.get("model", DEFAULT_MODEL), {})[name] = entry
    for entries in models.values():
        lines += [*stage_position_section(entries), *overlap_chance_section(entries), ""]
    save_json(saved, RESULTS / "seesaw.json")
    text = "\n".join(lines)
    write_atomic(RESULTS / "seesaw.md", lambda p: p.write_text(text))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the defaults that depend on the size filled in."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="full")
    p.add_argument("--quick", action="store_const", const="quick", dest="size", help="same as --size quick")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    parts = ["main", "matched", "dense", "forgetting", "ablations"]
    p.add_argument("--parts", nargs="+", default=None, choices=parts, help="default: main with --quick, else all")
    p.add_argument("--ablations", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS), metavar="NAME")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model alias or directory")
    p.add_argument(
        "--pairs",
        nargs="+",
        type=lambda s: tuple(s.split(">")),
        metavar="A>B",
        help="forgetting pairs (default: every ordered pair of the first three tasks)",
    )
    p.add_argument(
        "--eval-items",
        type=int,
        help="score on this many held-out items per task: rescores finished runs without training again, in a "
        "section `<size>-eval<N>` of the results",
    )
    p.add_argument("--forgetting-p", type=float, help="core size p of the forgetting part (default: the recipe's)")
    p.add_argument("--matched-baselines", nargs="+", default=MATCHED, metavar="ID", help="baselines of `matched`")
    p.add_argument(
        "--matched-p", type=lambda v: v if v == "auto" else float(v), default=MATCHED_P, help="core size p of `matched`"
    )
    p.add_argument("--task-set", type=int, metavar="K", help="the K-th task set bench/screen.py drew (default: ours)")
    p.add_argument("--report", action="store_true", help="only write seesaw.md again from seesaw.json")
    args = p.parse_args(argv)
    args.seeds = args.seeds or ([0, 1, 2] if args.size == "full" else [0])
    args.parts = args.parts or (["main"] if args.size == "quick" else parts)
    return args


@contextlib.contextmanager
def saved_results() -> Iterator[dict]:
    """seesaw.json's content, written back with its tables on exit; under a lock, so invocations running side by side
    do not drop each other's runs."""
    WORK.mkdir(parents=True, exist_ok=True)
    with open(WORK / "seesaw.json.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = RESULTS / "seesaw.json"
        saved = json.loads(path.read_text()) if path.exists() else {"sizes": {}}
        yield saved
        write_results(saved)


def main() -> None:
    args = parse_args()
    if args.report:  # the tables again from seesaw.json (after a change to this report): nothing trains
        with saved_results():
            pass
        print((RESULTS / "seesaw.md").read_text())
        return
    size, name = SIZES[args.size], section_name(args)
    if args.eval_items:  # the same runs rescored: their own section, so the tables of each item count stay whole
        size = {**size, "eval_items": args.eval_items}
    if args.task_set is None:
        tasks = TASKS[: size["tasks"]]
    else:  # a set's size records the new tokens it generates: its answers may be longer than the seesaw's
        tasks, new_tokens = drawn_set(args.task_set)
        size = {**size, "new_tokens": new_tokens}
    start, commit = time.time(), provenance.commit()  # the code that runs, whatever is committed meanwhile
    device, versions = provenance.device(), provenance.versions()

    def save(out: dict) -> None:
        """The runs finished so far merged into seesaw.json and its tables: a stopped invocation keeps them."""
        with saved_results() as saved:
            saved["sizes"][name] = {
                "size": size,
                "tasks": tasks,
                "model": args.model,
                "runs": merged(saved, name, size, out),
                "command": f"python bench/seesaw.py {' '.join(sys.argv[1:])}",
                "minutes": (time.time() - start) / 60,
                "device": device,
                "date": time.strftime("%Y-%m-%d"),
                "commit": commit,
                "versions": versions,
            }

    save(runs(args, size, tasks, work_root(name), finished=save))
    print((RESULTS / "seesaw.md").read_text())
    written = [str(RESULTS / f) for f in ("seesaw.md", "seesaw.json", f"seesaw_{name}.png")]
    print(json.dumps({"written": [f for f in written if Path(f).exists()]}))


if __name__ == "__main__":
    main()
