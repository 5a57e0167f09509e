"""Part 1: the seesaw benchmark at the small size, one seed, adapter mode on the nf4 base, 200 eval items.

The recipe is bench/seesaw.py's own (`recipe()`, the `main` part: SmolLM2-135M-Instruct, three reasoning-gym
tasks, 40-step probes and stages, `plan.groups` for multistage_given), run through the same pipeline in two
phases on one run directory, so a deadline cuts the second one only:

  A  base, the probes (single-task evidence), CPI-FT and multi-task SFT: the minimum useful result;
  B  the other baselines of `main` (multistage_random, multistage_given, lora_multitask), reusing A's steps.

`--prepare` does the part's CPU-only work ahead, in the background while the GPU runs parts 2 and 3: it
converts the model's GGUF file once (the cached Hugging Face directory) and generates the tasks' data, which
is saved with dill (number_sequence's generator alone takes about 30 s for 456 items); the part then reads
that file instead of generating the data again, and reads it once for both phases.

Two settings differ from seesaw.py and change no score's meaning: eval batch 128 (16 there; greedy decoding,
so only bf16 rounding differs) and no mid-run checkpoints (save_steps; they serve resuming only). The
table is seesaw.py's `methods_section` and `goals`. Dry run: a tiny random Llama (tests/tiny.py), 2 steps.
"""

from __future__ import annotations

import json
import os
import time

from common import header, parser, save_json, write

TINY = dict(tasks=3, train=16, eval=4, probe=2, stage=2, seq=64, eval_items=4)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-items", type=int, default=200)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prepare", action="store_true", help="only convert the model and generate the data")
    args = p.parse_args()
    start = time.time()
    import seesaw  # bench/seesaw.py: common put bench/ on the path

    from peft_isolate import pipeline

    if args.dry_run:
        from tiny import tiny_llama

        size, model = dict(TINY), args.work / "tiny-llama"
        if not (model / "config.json").is_file():  # built aside and renamed: --prepare may be killed
            tmp = args.work / f".tiny-llama.{os.getpid()}"
            tiny_llama(tmp)
            os.rename(tmp, model)
        model = str(model)
    else:
        size, model = {**seesaw.SIZES["small"], "eval_items": args.eval_items}, args.model
    tasks = seesaw.TASKS[: size["tasks"]]
    given = [g for g in ([t for t in g if t in tasks] for g in seesaw.GIVEN) if g]
    out_dir = args.work / f"seesaw-small-seed{args.seed}"
    changes = {
        "plan": {"seed": args.seed, "groups": given},  # as seesaw's `main`: the same plan hash in both phases
        "eval": {"batch_size": 128},
        "training": {"save_steps": 10**6},
    }
    phases = {
        "A": ["multitask"],
        "B": [*seesaw.STAGED, "lora_multitask"],
    }
    cache = args.work / "part1_tasks.dill"
    if args.prepare:
        prepare(seesaw.recipe(size, tasks, args.seed, out_dir, model, **changes), cache)
        print(f"part 1 prepared in {time.time() - start:.0f} s: model {model}, data {cache}", flush=True)
        return
    use_cache(pipeline, cache)
    path = args.out / "part1_seesaw.md"
    done: dict[str, float] = {}
    results = None
    for phase, baselines in phases.items():
        note = f"phase {phase} running (baselines {', '.join(baselines)})"
        write(path, table(args, size, model, done, results, note, start))
        recipe = seesaw.recipe(size, tasks, args.seed, out_dir, model, **changes, baselines=baselines)
        print(f"== part 1, phase {phase}: {recipe.quantization} base, baselines {baselines}", flush=True)
        results = pipeline.run_pipeline(recipe)
        done[phase] = time.time() - start
        save_json(args.work / "part1_results.json", results)
        write(path, table(args, size, model, done, results, "", start))
    print("\n".join(table(args, size, model, done, results, "", start)), flush=True)


def _key(source, name=None, **kwargs) -> str:
    return json.dumps([source, name, kwargs], sort_keys=True, default=str)


def prepare(recipe, cache) -> None:
    """The model converted (cached by peft_isolate.models) and every task's data, saved to `cache`."""
    import dill

    from peft_isolate import pipeline
    from peft_isolate.models import resolve_model

    resolve_model(recipe.model)
    calls = {}

    def recording(source, name=None, **kwargs):
        calls[_key(source, name, **kwargs)] = task = load(source, name, **kwargs)
        return task

    load, pipeline.load_task = pipeline.load_task, recording
    pipeline.load_run(recipe)
    tmp = cache.with_name(f".{cache.name}.tmp")
    tmp.write_bytes(dill.dumps(calls))
    os.replace(tmp, cache)


def use_cache(pipeline, cache) -> None:
    """`pipeline.load_task` answered from the prepared file, else generated once per process."""
    import dill

    known = dill.loads(cache.read_bytes()) if cache.is_file() else {}
    print(f"part 1: {len(known)} prepared task(s) from {cache}", flush=True)
    load = pipeline.load_task

    def cached(source, name=None, **kwargs):
        key = _key(source, name, **kwargs)
        if key not in known:
            known[key] = load(source, name, **kwargs)
        return known[key]

    pipeline.load_task = cached


def table(args, size: dict, model: str, done: dict, results: dict | None, note: str, start: float) -> list[str]:
    import seesaw

    quant = "nf4" if seesaw.torch.cuda.is_available() else "none (no GPU)"
    what = (
        f"Seesaw benchmark, bench/seesaw.py's recipe for `main`: size {size}, seed {args.seed}, model {model}, "
        f"quantization {quant}, adapter mode, eval batch 128, no mid-run checkpoints. Phases done: "
        + (", ".join(f"{k} at {v:.0f} s" for k, v in done.items()) or "none")
        + (f"; {note}" if note else "")
        + f"; {time.time() - start:.0f} s so far. Scores in points (scorer x 100, exact match in brackets), "
        f"one seed. Recipe as `python bench/seesaw.py --size small --seeds {args.seed} --parts main "
        f"--eval-items {size.get('eval_items')}` (run directory {args.work}/seesaw-small-seed{args.seed})."
    )
    lines = header("Part 1: seesaw benchmark (small size, one seed)", args, what)
    if results is None:
        return lines + ["No results yet (the deadline came before phase A finished)."]
    section, means = seesaw.methods_section("## Methods", [results])
    return lines + section + seesaw.goals({"methods": means})


if __name__ == "__main__":
    main()
