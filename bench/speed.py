"""One training step of the isolation adapter vs peft QLoRA and SHiRA at equal trainable parameters.

Each (method, density, sequence length) runs in its own process on the same base, batch and tokens, so peak
memory is not polluted by the others. Reported per step: median time over the timed steps after warm-up; peak
memory above the loaded model, warm-up (optimizer state) included (CPU: sampled RSS; GPU:
torch.cuda.max_memory_allocated); ratios to QLoRA and to the floor ("none": base forward + backward to the
inputs, no adapter). `--repeats N` runs every method N times, interleaved, and reports medians. The structured
rows (isolation_row, _column, _block16, _block64) take whole units of each weight while they fit in its density
(so a unit larger than a weight's budget is not taken: their trainable counts are shown). Two "before"
rows: isolation_csr (training through the base layer plus the CSR product of the delta instead of the merged
product) and isolation_dense_grad (the value gradient taken from the full weight gradient instead of the SDDMM;
on CUDA the layer does that anyway, see bench/value_gradient.py). `--labels N` labels only the last N tokens
of each row, as answer-only SFT does, and runs the output head only there, as peft_isolate's training does
(`training.head_at_labels`); the default 0 labels every token and runs the full head.

    python bench/speed.py                       # SmolLM2-135M nf4 on CPU, density 1%, batch 4 x 128
    python bench/speed.py --density 0.001 0.01 0.05 --seq 128
    python bench/speed.py --steps 4 --repeats 3 --methods none qlora shira isolation isolation_csr
    python bench/speed.py --density 0.001 0.01 0.05 --repeats 3 --methods none qlora shira isolation \
        isolation_row isolation_column isolation_block16 isolation_block64 --out bench/results/speed_structured.md
    python bench/speed.py --shape 1b --quant nf4 --seq 256 1024   # GPU: random Llama of TinyLlama-1.1B shape
    python bench/speed.py --quant none --batch 8 --seq 96 --labels 0 16 --methods none qlora isolation
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import provenance
import torch

RESULTS = Path(__file__).parent / "results"
METHODS = ("none", "qlora", "shira", "isolation", "isolation_csr", "isolation_dense_grad")
# structured supports (whole rows, columns or blocks of each weight; the fast path of tuner/ops.py's GradientCover)
STRUCTURED = {
    "isolation_row": {"granularity": "row"},
    "isolation_column": {"granularity": "column"},
    "isolation_block16": {"granularity": "block", "block": 16},
    "isolation_block64": {"granularity": "block", "block": 64},
}
METHODS += tuple(STRUCTURED)
SHAPES = {  # random Llama shapes for GPU timing (weights do not matter for speed)
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
}


def load(args):
    """SmolLM2-135M (CPU or GPU), or a random bf16 Llama of a larger shape saved once (no tokenizer: timing needs
    none) and loaded like a checkpoint."""
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from peft_isolate.models import ALIASES, load_model

    if args.shape == "smollm2":
        return load_model("smollm2-135m", quantization=args.quant)[0]
    if args.shape in ALIASES:  # another built-in model, e.g. gemma3-270m
        return load_model(args.shape, quantization=args.quant)[0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = Path(tempfile.gettempdir()) / f"peft-isolate-bench-{args.shape}"
    if not path.exists():
        with torch.device(device):  # random init of a billion weights is slow on a CPU
            LlamaForCausalLM(LlamaConfig(**SHAPES[args.shape])).to(torch.bfloat16).save_pretrained(path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    kwargs = {"quantization_config": quant} if args.quant == "nf4" else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": device}, **kwargs)


def _linear_sizes(model) -> tuple[int, int]:
    """(sum of in+out, sum of in*out) over the linear layers an all-linear adapter targets."""
    import torch.nn as nn

    rows = [
        (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not n.endswith("lm_head")
    ]
    return sum(i + o for i, o in rows), sum(i * o for i, o in rows)


def adapt(model, method: str, density: float):
    from peft import LoraConfig, ShiraConfig, get_peft_model

    from peft_isolate import IsolationConfig

    fan, numel = _linear_sizes(model)
    r = max(1, round(density * numel / fan))
    if method == "none":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()
        return model
    if method == "qlora":
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0)
    elif method == "shira":
        cfg = ShiraConfig(r=r, target_modules="all-linear")
    else:
        if method == "isolation_csr":
            _use_csr_product()
        if method == "isolation_dense_grad":
            _use_dense_value_gradient()
        cfg = IsolationConfig(target_modules="all-linear", density=r * fan / numel, **STRUCTURED.get(method, {}))
    return get_peft_model(model, cfg)


def _use_csr_product() -> None:
    """The "before" of the merged training product: training steps take the base layer plus the CSR product of
    the delta, as inference does. Benchmark-only."""
    from peft_isolate.tuner.layer import Linear

    Linear._trains_merged = lambda self, x, adapter: False


def _use_dense_value_gradient() -> None:
    """The "before" of the value gradient: the full out x in weight gradient G^T X, then its entries at the
    support, instead of the sampled product (SDDMM) over the support only. Benchmark-only."""
    from peft_isolate.tuner.ops import DeltaPattern

    def dense_value_gradient(self, g2d, x2d, dtype):
        return (g2d.T @ x2d.to(g2d.dtype)).flatten()[self.indices.long()].to(dtype)

    DeltaPattern.value_gradient = dense_value_gradient


class PeakRSS(threading.Thread):
    """Samples this process's RSS every 2 ms; `peak` is the maximum seen."""

    def __init__(self):
        super().__init__(daemon=True)
        import psutil

        self.proc, self.peak, self.running = psutil.Process(), 0, True

    def run(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)


def run_one(args, model=None) -> dict:
    """Time `args.steps` training steps of one method in this process (of `model`, already adapted, if given)."""
    torch.manual_seed(0)
    model = model if model is not None else adapt(load(args), args.method, args.density)
    trainable = [p for p in model.parameters() if p.requires_grad]
    tokens = torch.randint(0, 1000, (args.batch, args.seq), device=next(model.parameters()).device)
    time_s, peak = time_steps(model, tokens, args.steps, args.labels)
    return {
        "method": args.method,
        "density": args.density,
        "seq": args.seq,
        "labels": args.labels,
        "trainable": sum(p.numel() for p in trainable) if args.method != "none" else 0,
        "time_s": time_s,
        "peak_mib": peak / 2**20,
    }


def time_steps(model, tokens: torch.Tensor, steps: int, labelled: int = 0) -> tuple[float, float]:
    """The median time of `steps` AdamW training steps on `tokens` after one warm-up step, and the peak memory
    (bytes) above what was allocated before: CUDA's allocator on a GPU, the sampled RSS on CPU. `labelled` > 0:
    only each row's last `labelled` tokens are labels, and the head runs only where they are."""
    from peft_isolate.training import head_at_labels, label_loss

    cuda = tokens.device.type == "cuda"
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    labels = tokens.clone()
    labels[:, : tokens.shape[1] - labelled] = -100

    def step():
        if labelled:
            with head_at_labels(model, labels):
                loss = label_loss(model(input_ids=tokens).logits, labels)
        else:
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    else:
        import psutil

        base_mem = psutil.Process().memory_info().rss
        sampler = PeakRSS()
        sampler.start()
    step()  # warm-up (counted in peak memory: it allocates the optimizer state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base_mem
    else:
        sampler.running = False
        sampler.join()
        peak = sampler.peak - base_mem
    return statistics.median(times), peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2", choices=["smollm2", "gemma3-270m", *SHAPES])
    p.add_argument("--quant", default="nf4", choices=["nf4", "none"])
    p.add_argument("--density", type=float, nargs="+", default=[0.01])
    p.add_argument("--seq", type=int, nargs="+", default=[128])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--labels", type=int, nargs="+", default=[0], help="labelled tokens a row (0: every token)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1, help="runs of every method; the table shows their medians")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--out", default=str(RESULTS / "speed.md"))
    p.add_argument("--method", help=argparse.SUPPRESS)  # child mode: one measurement, JSON on stdout
    args = p.parse_args()
    if args.method:
        args.density, args.seq, args.labels = args.density[0], args.seq[0], args.labels[0]
        print(json.dumps(run_one(args)))
        return
    runs: dict[tuple, list[dict]] = {}
    failed: list[str] = []
    for repeat in range(args.repeats):  # methods interleaved, so a drifting machine slows all of them alike
        for seq, labelled, density, method in itertools.product(args.seq, args.labels, args.density, args.methods):
            if method == "none" and density != args.density[0]:  # the floor has no density
                continue
            cmd = [sys.executable, __file__, "--method", method, "--shape", args.shape, "--quant", args.quant]
            cmd += ["--density", str(density), "--seq", str(seq), "--labels", str(labelled)]
            cmd += ["--batch", str(args.batch), "--steps", str(args.steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                failed.append(f"{method} (seq {seq}, density {density}): {proc.stderr.strip().splitlines()[-1]}")
                print(f"FAILED {failed[-1]}\n{proc.stderr[-3000:]}", flush=True)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            runs.setdefault((seq, labelled, density, method), []).append(row)
            print(f"repeat {repeat}: {row}", flush=True)
            write_table(_medians(runs), failed, args)  # a run cut short still leaves its table
    print(write_table(_medians(runs), failed, args))


def _medians(runs: dict[tuple, list[dict]]) -> list[dict]:
    return [
        {**same[0], "time_s": statistics.median(r["time_s"] for r in same)}
        | {"peak_mib": statistics.median(r["peak_mib"] for r in same)}
        for same in runs.values()
    ]


def ratio(row: dict, ref: dict | None, key: str) -> str:
    return f"{row[key] / ref[key]:.2f}" if ref and ref[key] > 0 else "-"


def table_rows(rows: list[dict], failed: list[str]) -> list[str]:
    """The rows of the speed table (step time and peak memory, with their ratios to QLoRA and to the floor of the
    same sequence length and labels), then the failures."""
    qlora = {(m["seq"], m["labels"], m["density"]): m for m in rows if m["method"] == "qlora"}
    floor_of = {(m["seq"], m["labels"]): m for m in rows if m["method"] == "none"}  # the floor has no density
    full_head = {(m["seq"], m["density"], m["method"]): m for m in rows if not m["labels"]}
    lines = []
    for r in rows:
        lora, floor = qlora.get((r["seq"], r["labels"], r["density"])), floor_of.get((r["seq"], r["labels"]))
        every = full_head.get((r["seq"], r["density"], r["method"]))
        density = "-" if r["method"] == "none" else f"{r['density']:.3%}"
        labels = r["labels"] or "all"
        lines.append(
            f"| {r['seq']} | {labels} | {density} | {r['method']} | {r['trainable']:,} | {r['time_s']:.3f} | "
            f"{ratio(r, lora, 'time_s')} | {ratio(r, floor, 'time_s')} | {ratio(r, every, 'time_s')} | "
            f"{r['peak_mib']:.0f} | {ratio(r, lora, 'peak_mib')} |"
        )
    return lines + [f"\nFailed: {f}" for f in dict.fromkeys(failed)]  # once, however many repeats failed


def write_table(rows: list[dict], failed: list[str], args) -> str:
    device = provenance.device()
    lines = [
        f"Model: {args.shape} ({args.quant}), batch {args.batch}, {args.steps} timed steps after 1 warm-up, "
        f"median of {args.repeats} interleaved run(s) per method, "
        f"device: {device}, {provenance.versions()}, date {time.strftime('%Y-%m-%d')}, commit {provenance.commit()}.",
        "Command: `python bench/speed.py " + " ".join(sys.argv[1:]) + "`",
        "",
        "| seq | labels | density | method | trainable | step (s) | x QLoRA | x floor | x all labels | peak mem (MiB) "
        "| mem x QLoRA |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += table_rows(rows, failed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
