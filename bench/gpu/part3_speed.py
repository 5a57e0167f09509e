"""Part 3: bench/speed.py's sweep on the GPU: TinyLlama-1.1B's shape in nf4, seq 256 and 1024, density
0.1 / 1 / 5 %, the floor (none), QLoRA, SHiRA and the isolation adapter on element, row, column and 64-block
supports (the structured fast path), 10 timed steps each.

Measured with speed.py's own functions (`load`, `adapt`, `run_one`: same model, batch 4, tokens, optimizer,
warm-up, median step and peak-memory rules), but in one process on one loaded base (each adapter unloaded
after its row) instead of a process per row, which would spend most of the part's deadline starting Python
and loading the model 20 times. torch's peak allocated memory is measured from each row's own start, so
earlier rows do not enter it; a first floor step before the sweep takes the one-off CUDA/cuBLAS allocations.
Rows run in order of value: density 1 % at both lengths first, then 0.1 %, then 5 %, and the table is
rewritten after each, so a deadline keeps what was measured.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import torch
from common import TINY_LLAMA, header, parser, peak_memory_reset, write

METHODS = ("none", "qlora", "shira", "isolation", "isolation_row", "isolation_column", "isolation_block64")


def prebuild(shape: str) -> float:
    """Save speed.py's random model for `shape` where its `load` looks, atomically (speed.py itself takes any
    existing folder as complete, so a build killed half-way would break every later run)."""
    import speed
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(tempfile.gettempdir()) / f"peft-isolate-bench-{shape}"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return 0.0
    start = time.time()
    shutil.rmtree(path, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**speed.SHAPES[shape])).to(torch.bfloat16)
    model.save_pretrained(tmp)
    del model
    os.rename(tmp, path)
    return time.time() - start


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seq", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--density", type=float, nargs="+", default=[0.01, 0.001, 0.05], help="in this order")
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    import speed  # bench/speed.py

    shape, steps, seqs = "1b", args.steps, args.seq
    methods = METHODS
    if args.dry_run:  # a 64-wide model: whole units fit its weights' budgets at 5 % only, 64-blocks never
        speed.SHAPES["gpu-dry-tiny"] = TINY_LLAMA
        shape, steps, seqs = "gpu-dry-tiny", 1, [32]
        methods = tuple(m.replace("block64", "block16") for m in METHODS)
    info = {"shape": shape, "steps": steps, "batch": args.batch, "build_s": prebuild(shape)}
    run = argparse.Namespace(
        shape=shape, quant="nf4", batch=args.batch, steps=steps, method="none", density=0.01, labels=0
    )
    t0 = time.time()
    base = speed.load(run)
    info["load_s"] = time.time() - t0
    adapted: list = []
    rows, failed = [], []
    out = args.out / "part3_speed.md"
    write(out, table(args, info, rows, failed, "warming up"))
    first = True
    for density in args.density:
        for seq in seqs:
            for method in methods:
                if method == "none" and density != args.density[0]:
                    continue  # the floor has no density: once per length
                if args.dry_run and method in speed.STRUCTURED and density < 0.05:
                    continue
                run.method, run.density, run.seq = method, density, seq
                try:
                    if first:  # one-off allocations (CUDA context, cuBLAS workspace) before any measured row
                        adapted.append(speed.adapt(base, "none", density))
                        speed.run_one(argparse.Namespace(**{**vars(run), "method": "none", "steps": 1}), adapted[-1])
                        _release(base, adapted)
                        first = False
                    peak_memory_reset()
                    adapted.append(speed.adapt(base, method, density))  # every row on the one loaded base
                    rows.append(speed.run_one(run, adapted[-1]))
                    print(f"part 3: {rows[-1]}", flush=True)
                except Exception as e:  # a failing method is a result too; the others go on
                    failed.append(f"{method} (seq {seq}, density {density}): {type(e).__name__}: {e}"[:400])
                    traceback.print_exc()
                _release(base, adapted)
                write(out, table(args, info, rows, failed, f"running ({len(rows)} rows so far)"))
    lines = table(args, info, rows, failed, "")
    write(out, lines)
    print("\n".join(lines), flush=True)


def _release(base, adapted: list) -> None:
    """Take the adapter of the last row off the base again (the floor only froze it and hooked its inputs)."""
    while adapted:
        model = adapted.pop()
        if model is base:
            base.disable_input_require_grads()
        else:
            model.unload()
    gc.collect()
    peak_memory_reset()


def table(args, info: dict, rows: list[dict], failed: list[str], note: str) -> list[str]:
    import speed

    what = (
        f"Model: speed.py's random Llama of shape `{info['shape']}`"
        + (" (TinyLlama-1.1B)" if info["shape"] == "1b" else "")
        + f", nf4, bf16 compute; batch {info['batch']}, {info['steps']} timed steps after 1 warm-up (median), "
        f"one run per row, all linear layers, equal trainable counts (LoRA/SHiRA rank r, isolation density "
        f"r(in+out)/(in*out)). Peak memory: torch's peak allocated above the row's start (optimizer state "
        f"included; CPU: RSS). Build {info['build_s']:.0f} s (0: reused), load {info['load_s']:.0f} s. "
        "Same rows as `python bench/speed.py --shape 1b --quant nf4 --seq 256 1024 --density 0.001 0.01 0.05 "
        "--steps 10 --methods "
        + " ".join(METHODS)
        + "`, in one process. "
        + (f"Status: {note}." if note else "Status: done.")
    )
    lines = header(
        "Part 3: speed sweep (floor, QLoRA, SHiRA, isolation on element and structured supports)", args, what
    )
    lines += [
        "| seq | labels | density | method | trainable | step (s) | x QLoRA | x floor | x all labels | peak mem (MiB) "
        "| mem x QLoRA |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(rows, key=lambda r: (r["seq"], r["density"] if r["method"] != "none" else -1))
    return lines + speed.table_rows(order, failed)


if __name__ == "__main__":
    main()
