"""Screen reasoning-gym generators for learnability at the seesaw's small size, then draw task sets nobody picked.

    python bench/screen.py --sample 12             # screen the first 12 short-answer generators of the seed stream
    python bench/screen.py --sample 18 --sets 3    # screen 6 more of the same stream, then draw 3 sets of 3
    python bench/screen.py --sample 60 --max-answer-tokens 28   # the same stream's second tier: longer answers

1. Candidates: every reasoning-gym generator except the seesaw's own tasks, in the order of a shuffle seeded by
   `--seed`. A generator is *short* when the longest of 50 sampled answers is at most `--max-answer-tokens` tokens
   of the model's tokenizer, and is generated with the new tokens of the first tier in `ANSWER_TIERS` that holds
   its answers (the small size's 16 for 12: room for the end of turn and a stray token). The first `--sample`
   short ones are screened; a larger `--sample` screens further down the same stream, a larger
   `--max-answer-tokens` its second tier in the same order. A short generator that cannot give the screening items
   (too few distinct questions) is marked unusable before any training and does not count.
2. Each: the small size's single-task LoRA probe (256 train items, 40 steps) through the pipeline's probe step,
   then the base and the probe scored on `--items` screening items: task seed `SCREEN_SEED`, leaving out the
   probe's train questions and every question among the benchmark's eval items (task seeds 100-103, which
   `seesaw.py` uses). A generator *passes* when the probe scores at least 10 points above both the base and the
   majority answer; when base or majority already score above 90 no probe can, and none is trained ("no room").
3. Sets: up to `--sets` disjoint sets of three passing generators, each spanning at least two answer formats
   (number, word, list), each a seeded random draw (`--seed` and the set's number, recorded) from the passing
   generators no earlier set holds, made as soon as they can give one, so a set can run while screening goes on.
   Nothing is swapped by hand after a result, and a drawn set stays: later screening only adds sets. A set's runs
   generate the largest new-token count of its generators (`generation_length`).

Resumable: probes live under bench/_work/screen/probes/<generator>/, scores in bench/results/screen.json.
Writes bench/results/screen.md and screen.json.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
from pathlib import Path

import provenance
from seesaw import SCREENED, SIZES, TASKS, WORK, recipe

from peft_isolate.files import load_json, save_json, write_atomic
from peft_isolate.recipe import Recipe

RESULTS = Path(__file__).parent / "results"
SCREEN_SEED = 7  # the screening items' task seed; the benchmark's tasks use 100 + their position
BENCH_SEEDS = range(100, 104)
# longest answer (tokens) -> new tokens generated: the small size's tier, then a second one, for when the first
# tier of the stream holds too few passing generators for the sets
ANSWER_TIERS = {12: 16, 28: 32}
LIFT = 0.10
SCREEN_WORK = WORK.parent / "screen"  # one run directory: every screened generator's probe
PARTNER = "calendar_arithmetic"  # a seesaw task (never a candidate) that generates its items fast
_NUMBER = re.compile(r"-?\d+(?:[./]\d+)?")


def answer_format(answers: list[str]) -> str:
    """`number` when every answer is one (integer, decimal or fraction), `list` when most hold a comma or a
    bracket, else `word`."""
    if all(_NUMBER.fullmatch(a.strip()) for a in answers):
        return "number"
    if sum(("," in a) or a.strip().startswith("[") for a in answers) > len(answers) / 2:
        return "list"
    return "word"


def generation_length(answer_tokens: int) -> int | None:
    """The new tokens a generator whose longest answer takes `answer_tokens` is generated with: the first tier of
    `ANSWER_TIERS` that holds it, None past the last."""
    return next((new for limit, new in ANSWER_TIERS.items() if answer_tokens <= limit), None)


def draw_sets(passing: dict[str, str], n_sets: int, size: int, seed: int | str) -> list[list[str]]:
    """`n_sets` disjoint sets of `size` generators from `passing` ({name: format}), each spanning at least two
    formats: seeded draws from the shuffled pool, a draw kept only if it spans two formats. Raises a ValueError
    when the pool cannot give them (screen more)."""
    rng = random.Random(seed)
    pool = sorted(passing)
    for _ in range(1000):
        rng.shuffle(pool)
        sets = [sorted(pool[i * size : (i + 1) * size]) for i in range(n_sets)]
        if len(pool) >= n_sets * size and all(len({passing[t] for t in s}) >= 2 for s in sets):
            return sets
    raise ValueError(
        f"{len(passing)} passing generator{'s' * (len(passing) != 1)} ({sorted(set(passing.values()))}) cannot give "
        f"{n_sets} disjoint set{'s' * (n_sets != 1)} of {size} spanning two answer formats: screen more "
        "(a larger --sample)"
    )


def draw_new_sets(saved: dict, n_sets: int) -> None:
    """Add sets to `saved["sets"]` until it holds `n_sets` or the passing generators no set holds cannot give
    another: set K is drawn from those with seed "<seed>/<K>". Drawn sets stay (a set's runs stay runs of the same
    tasks however many generators pass later); `drawn_after` records how many generators were screened at each
    draw, `sets_error` why no further set could be drawn yet."""
    sets = saved.setdefault("sets", None) or []
    saved.setdefault("drawn_after", [])
    saved["sets_error"] = None
    screened = sum("passed" in r for r in saved["generators"].values())
    while len(sets) < n_sets:
        taken = {t for s in sets for t in s}
        passing = {n: r["format"] for n, r in saved["generators"].items() if r.get("passed") and n not in taken}
        try:
            sets += draw_sets(passing, 1, 3, f"{saved['seed']}/{len(sets)}")
        except ValueError as e:
            saved["sets_error"] = f"set {len(sets)}: {e}"
            break
        saved["drawn_after"].append(screened)
    saved["sets"] = sets or None


def candidates(seed: int, tokenizer) -> list[tuple[str, str, int]]:
    """(generator, answer format, longest answer in tokens) for every generator that is not the seesaw's, in the
    seeded order; generators that fail to generate are left out."""
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    names = sorted(set(DATASETS) - set(TASKS))
    random.Random(seed).shuffle(names)
    out = []
    for name in names:
        try:
            data = reasoning_gym.create_dataset(name, size=50, seed=SCREEN_SEED)
            answers = [str(data[i]["answer"]) for i in range(50)]
        except Exception as e:  # a generator that needs a dependency or data this machine lacks
            print(f"skip {name}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        out.append((name, answer_format(answers), longest))
    return out


def screening_task(name: str, items: int):
    """The generator's screening items: task seed SCREEN_SEED, none of the benchmark's eval questions and none of
    the probe's train questions."""
    from peft_isolate.data import TaskData, load_task

    size = SIZES["small"]
    task = load_task(f"reasoning_gym:{name}", train=size["train"], eval=3 * items, seed=SCREEN_SEED)
    benchmark = set()  # the eval items follow the train items, so every size's train count gives other ones
    for seed in BENCH_SEEDS:
        for train in {s["train"] for s in SIZES.values()}:
            benchmark |= {e.prompt for e in load_task(f"reasoning_gym:{name}", train=train, eval=200, seed=seed).eval}
    seen = benchmark | {e.prompt for e in task.train}  # a small generator repeats questions: none the probe saw
    kept = [e for e in task.eval if e.prompt not in seen][:items]
    if len(kept) < items:
        raise ValueError(f"{name}: only {len(kept)} screening items outside the benchmark's eval items")
    return TaskData(name, task.train, kept, task.scorer)


def probe_recipe(names: list[str], out: Path, model_name: str) -> Recipe:
    """The small size's recipe over generators `names` (a recipe holds two tasks or more), each trained on items of
    task seed SCREEN_SEED. A probe's key depends on its own generator only, whatever else the recipe holds."""
    size = SIZES["small"]
    specs = {n: {"source": f"reasoning_gym:{n}", "train": size["train"], "eval": 8, "seed": SCREEN_SEED} for n in names}
    return recipe(size, names, 0, out, model_name, tasks=specs)


def screen_one(task, model_name: str, out: Path = SCREEN_WORK, max_new_tokens: int = 16) -> dict:
    """Score base and majority answer on one generator's screening items (`task`, `screening_task`), generating
    `max_new_tokens`; unless they already leave no room for a 10-point lift, train the small size's probe in the run
    directory `out` (unless a complete one is there) and score it."""
    from peft import PeftModel

    from peft_isolate import rundir
    from peft_isolate.evaluate import evaluate, majority_baseline, merged_for_generation
    from peft_isolate.models import load_model
    from peft_isolate.pipeline import load_run, run_probe

    start, name = time.time(), task.name
    config = probe_recipe([name, PARTNER], out, model_name)  # a recipe holds two tasks; the partner never trains
    model, tokenizer = load_model(model_name)
    settings = {"max_new_tokens": max_new_tokens, "batch_size": config.eval.batch_size}
    scores = {
        "base": evaluate(model, tokenizer, [task], **settings)[name]["score"],
        "majority": majority_baseline(task),
    }
    if max(scores.values()) + LIFT > 1:  # no probe can pass: none is trained
        return scores | {"passed": False, "minutes": (time.time() - start) / 60}
    with rundir.claim(out):
        run_probe(load_run(config), name)
    probe = merged_for_generation(PeftModel.from_pretrained(model, out / "probes" / name))
    lifted = evaluate(probe, tokenizer, [task], **settings)[name]["score"]
    return scores | {
        "probe": lifted,
        "passed": lifted >= max(scores.values()) + LIFT,
        "minutes": (time.time() - start) / 60,
    }


def write_report(saved: dict, path: Path = RESULTS / "screen.md") -> str:
    """results/screen.md from screen.json: every generator the stream reached, screened, pending or too long."""
    rows, longest = saved["generators"], saved.get("max_answer_tokens", min(ANSWER_TIERS))
    tiers = ", ".join(f"up to {limit} answer tokens with {new} new tokens" for limit, new in ANSWER_TIERS.items())
    lines = [
        "# Screening reasoning-gym generators (the seesaw's small size)",
        "",
        f"Command: `{saved['command']}`; {saved['date']}; {saved['device']}; commit {saved['commit']}.",
        f"Seed stream {saved['seed']}; short = longest of 50 answers at most {longest} tokens, generated in tiers "
        f"({tiers}); "
        f"{saved['items']} screening items per generator (task seed {SCREEN_SEED}, none of the benchmark's eval "
        f"items); pass = the 40-step probe at least {100 * LIFT:.0f} points above the base and the majority answer.",
        "",
        "| # | generator | format | answer tokens | new tokens | base | majority | probe | passed | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, (name, r) in enumerate(rows.items()):
        if "passed" not in r:
            state = "not short" if r["tokens"] > longest else "unusable" if "unusable" in r else "not screened yet"
            lines.append(f"| {i} | {name} | {r['format']} | {r['tokens']} | - | - | - | - | {state} | - |")
            continue
        probe, passed = (
            (f"{100 * r['probe']:.1f}", "yes" if r["passed"] else "no") if "probe" in r else ("-", "no room")
        )
        lines.append(
            f"| {i} | {name} | {r['format']} | {r['tokens']} | {generation_length(r['tokens'])} "
            f"| {100 * r['base']:.1f} | {100 * r['majority']:.1f} "
            f"| {probe} | {passed} | {r['minutes']:.1f} |"
        )
    if saved.get("sets"):
        after = saved.get("drawn_after", [])
        title = (
            f"Task sets (set K a seeded draw, seed {saved['seed']}/K, from passing generators no earlier set holds):"
        )
        lines += ["", title, ""]
        lines += [
            f"- set {k}: {', '.join(s)}" + (f" (drawn after {after[k]} screened)" if k < len(after) else "")
            for k, s in enumerate(saved["sets"])
        ]
    if saved.get("sets_error"):
        lines += ["", f"No further task set yet: {saved['sets_error']}"]
    text = "\n".join(lines) + "\n"
    write_atomic(path, lambda p: p.write_text(text))
    return text


def main() -> None:
    from transformers import AutoTokenizer

    from peft_isolate.models import resolve_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sample", type=int, default=12, help="screen the first N short generators of the stream")
    p.add_argument("--sets", type=int, default=3, help="task sets of three to draw from those that pass (once)")
    p.add_argument(
        "--max-answer-tokens",
        type=int,
        choices=sorted(ANSWER_TIERS),
        default=min(ANSWER_TIERS),
        help="screen generators whose answers take up to this many tokens (a tier of ANSWER_TIERS)",
    )
    p.add_argument("--items", type=int, default=200, help="screening items per generator")
    p.add_argument("--seed", type=int, default=0, help="seed of the generator stream and of the set draw")
    p.add_argument("--model", default="smollm2-135m")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as the pipeline does: saving an adapter would ask the Hub
    path = SCREENED
    saved = load_json(path) if path.exists() else {"generators": {}}
    if saved.get("seed", args.seed) != args.seed or saved.get("items", args.items) != args.items:
        raise SystemExit(f"{path} holds another seed or item count: move it away to screen afresh")
    saved |= {
        "seed": args.seed,
        "items": args.items,
        "max_answer_tokens": max(saved.get("max_answer_tokens", args.max_answer_tokens), args.max_answer_tokens),
        "command": "python bench/screen.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "device": provenance.device(),
        "commit": provenance.commit(),
    }
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))  # only to count answer tokens
    draw_new_sets(saved, args.sets)  # a set the screening so far can give runs before the rest is screened
    screened = 0
    for name, fmt, tokens in candidates(args.seed, tokenizer):
        if screened == args.sample:
            break
        entry = saved["generators"].setdefault(name, {"format": fmt, "tokens": tokens})
        if tokens > args.max_answer_tokens or "unusable" in entry:
            continue
        entry["new_tokens"] = generation_length(tokens)  # what seesaw.py generates for a set that holds it
        if "passed" not in entry:
            print(f"== screening {name} ({screened + 1}/{args.sample})", flush=True)
            try:  # before any training: a generator with too few distinct questions cannot be screened
                task = screening_task(name, args.items)
            except ValueError as e:
                entry["unusable"] = str(e)
                print(f"unusable: {e}", flush=True)
            else:
                entry |= screen_one(task, args.model, max_new_tokens=entry["new_tokens"])
            draw_new_sets(saved, args.sets)
            save_json(saved, path)
            write_report(saved)
        screened += "passed" in entry
    draw_new_sets(saved, args.sets)
    save_json(saved, path)
    print(write_report(saved))


if __name__ == "__main__":
    main()
