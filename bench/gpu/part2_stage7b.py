"""Part 2: one CPI-FT stage on a Llama-2-7B-shaped nf4 model at 2048 tokens with gradient checkpointing,
next to QLoRA at the same trainable count: peak GPU memory and step time (goal: CPI-FT <= 16 GB).

The model is random (weights do not matter for memory or speed): built from a LlamaConfig of Llama-2-7B's
shape on the GPU in bf16, saved once (reused by a rerun on the same machine) and loaded as a checkpoint with
bitsandbytes nf4 and bf16 compute, as a user's model would be. The stage is set up exactly as the pipeline's
second stage (`pipeline.train_stages`): an isolation adapter on the support A | B (two random 1% task cores),
then `hold()`, `lock(A)`, `add_trainable(B - A)`. QLoRA: peft LoRA on all linear layers at the rank whose
trainable count is nearest the stage's (the pipeline's lora_multitask rule). Both in one process on one loaded
base (QLoRA after unloading the isolation adapter), non-reentrant gradient checkpointing, batch 1 x 2048
random tokens, AdamW, one warm-up step (allocates the optimizer state) and then the timed steps. Peak memory
is torch's peak since the method's setup, whole process (model included); "above model" subtracts what was
allocated before the method's first step.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import TINY_LLAMA, gib, header, parser, peak_memory_reset, write

LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
GOAL_GIB = 16.0


def scratch(work: Path, size_gib: float) -> Path:
    """/dev/shm when it has room (no disk write for the 13 GB checkpoint), else the work folder."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > (size_gib + 8) * 2**30:
            return shm
    except OSError:
        pass
    return work


def build(path: Path, shape: dict, device: str) -> float:
    """A random bf16 Llama of `shape` saved at `path` (once: an existing complete one is reused)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "done").is_file():
        return 0.0
    start = time.time()
    shutil.rmtree(path, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):  # random init of 7B weights is fast on the GPU only
            model = LlamaForCausalLM(LlamaConfig(**shape))
        model.save_pretrained(tmp)
    finally:
        torch.set_default_dtype(default)
    del model
    gc.collect()
    peak_memory_reset()
    (tmp / "done").write_text("ok\n")
    os.rename(tmp, path)
    return time.time() - start


def load(path: Path, device: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, device_map={"": device}, quantization_config=quant
    )
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """{weight name: (out, in)} of the linear layers an all-linear adapter targets."""
    return {
        f"{n}.weight": (m.out_features, m.in_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    }


def random_core(shapes: dict, p: float, seed: int, device: str):
    """A task core of p of every weight's entries, drawn uniformly (where a real probe puts them does not
    change the cost of a step)."""
    from peft_isolate.regions import CoreRegions

    gen = torch.Generator(device=device).manual_seed(seed)
    indices = {}
    for name, (rows, cols) in shapes.items():
        numel = rows * cols
        picked = torch.randperm(numel, generator=gen, device=device)[: max(1, round(p * numel))]
        indices[name] = picked.sort().values.to(torch.int32).cpu()
    return CoreRegions(indices, shapes, p=p, source=f"random core, seed {seed}")


def cpi_ft_stage(model, work: Path, p: float, device: str):
    """The pipeline's stage 1 of two: support A | B, A locked, B - A trainable."""
    from peft import get_peft_model

    from peft_isolate import IsolationConfig

    shapes = linear_shapes(model)
    a, b = random_core(shapes, p, 1, device), random_core(shapes, p, 2, device)
    support = a.union(b)
    support_path = support.save(work / "part2-support.safetensors")
    peft_model = get_peft_model(
        model, IsolationConfig(target_modules="all-linear", init="regions", regions=str(support_path))
    )
    peft_model.base_model.hold()
    peft_model.base_model.lock(a)
    trainable = peft_model.base_model.add_trainable(b.difference(a))
    locked = sum(
        int(m.isolation_frozen_locked[k].sum())
        for m in peft_model.modules()
        if hasattr(m, "isolation_frozen_locked")
        for k in m.isolation_frozen_locked
    )
    return peft_model, trainable, locked


def qlora(model, trainable: int):
    from peft import LoraConfig, get_peft_model

    shapes = linear_shapes(model)
    rank = max(1, round(trainable / sum(r + c for r, c in shapes.values())))
    return get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear", lora_dropout=0.0)
    ), rank


def measure(model, steps: int, seq: int, vocab: int) -> dict:
    """speed.py's timing of AdamW steps at batch 1 and `seq` tokens, with the absolute peak memory."""
    from speed import time_steps

    device = next(p for p in model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    else:
        import psutil

        before = psutil.Process().memory_info().rss
    step_s, above = time_steps(model, torch.randint(0, vocab, (1, seq), device=device), steps)
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "step_s": step_s,
        "tokens_s": seq / step_s,
        "peak": before + above,
        "reserved": torch.cuda.max_memory_reserved() if cuda else before + above,
        "above": above,
    }


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--p", type=float, default=0.01, help="core size of each of the two tasks")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    shape, seq, steps = (TINY_LLAMA, 64, 1) if args.dry_run else (LLAMA2_7B, args.seq, args.steps)
    args.work.mkdir(parents=True, exist_ok=True)
    name = "tiny" if args.dry_run else "llama2-7b"
    path = (args.work if args.dry_run else scratch(args.work, 13.5)) / f"peft-isolate-gpu-{name}-bf16"
    rows: list[dict] = []
    info: dict = {"shape": shape, "seq": seq, "steps": steps, "p": args.p, "path": str(path)}
    out = args.out / "part2_stage7b.md"
    write(out, table(args, info, rows, "building the model"))
    info["build_s"] = build(path, shape, device)
    t0 = time.time()
    model = load(path, device)
    info["load_s"] = time.time() - t0
    info["model_gib"] = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")
    write(out, table(args, info, rows, "CPI-FT stage running"))

    peak_memory_reset()
    t0 = time.time()
    stage, trainable, locked = cpi_ft_stage(model, args.work, args.p, device)
    setup = time.time() - t0
    rows.append(
        {
            "method": "cpi_ft (stage 1 of 2)",
            "locked": locked,
            "setup_s": setup,
            **measure(stage, steps, seq, shape["vocab_size"]),
        }
    )
    write(out, table(args, info, rows, "QLoRA running"))
    model = stage.unload()
    del stage
    gc.collect()

    peak_memory_reset()
    t0 = time.time()
    lora, rank = qlora(model, trainable)
    setup = time.time() - t0
    rows.append(
        {"method": f"qlora (r={rank})", "locked": 0, "setup_s": setup, **measure(lora, steps, seq, shape["vocab_size"])}
    )
    lines = table(args, info, rows, "")
    write(out, lines)
    print("\n".join(lines), flush=True)
    (args.work / "part2-support.safetensors").unlink(missing_ok=True)


def table(args, info: dict, rows: list[dict], note: str) -> list[str]:
    shape = info["shape"]
    what = (
        f"Model: random Llama, hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, intermediate "
        f"{shape['intermediate_size']}, vocab {shape['vocab_size']}"
        + (" (Llama-2-7B's shape)" if not args.dry_run else "")
        + f", nf4 with bf16 compute; batch 1 x {info['seq']} tokens, non-reentrant gradient checkpointing, AdamW; "
        f"{info['steps']} timed steps after 1 warm-up (median). Cores: two random tasks of p = {info['p']:g} each; "
        "the stage locks A and trains B - A. "
        + (f"Build {info['build_s']:.0f} s (0: reused), load {info['load_s']:.0f} s, " if "load_s" in info else "")
        + (f"loaded model {info['model_gib']:.2f} GiB. " if "model_gib" in info else "")
        + (f"Status: {note}." if note else "Status: done.")
    )
    unit = "GiB" if torch.cuda.is_available() else "GiB, CPU RSS"
    lines = header("Part 2: CPI-FT stage on a Llama-2-7B-shaped nf4 model, 2048 tokens", args, what)
    lines += [
        f"| method | trainable | locked | setup (s) | step (s) | tokens/s | peak ({unit}) | peak reserved (GiB) | "
        f"above model (GiB) | step x QLoRA | peak x QLoRA | <= {GOAL_GIB:g} GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = next((r for r in rows if r["method"].startswith("qlora")), None)
    for r in rows:
        ratio_t = f"{r['step_s'] / ref['step_s']:.2f}" if ref else "-"
        ratio_m = f"{r['peak'] / ref['peak']:.2f}" if ref else "-"
        fits = "yes" if r["reserved"] <= GOAL_GIB * 1e9 else "no"
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {r['locked']:,} | {r['setup_s']:.1f} | {r['step_s']:.3f} | "
            f"{r['tokens_s']:,.0f} | {gib(r['peak'])} | {gib(r['reserved'])} | {gib(r['above'])} | {ratio_t} | "
            f"{ratio_m} | {fits} |"
        )
    lines += ["", f"Goal column: peak reserved (what the allocator took from the card) <= {GOAL_GIB:g} GB (10^9 B)."]
    return lines


if __name__ == "__main__":
    main()
