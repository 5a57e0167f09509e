"""Benchmark: core-region selection from two checkpoint directories, against reading them once.

Writes synthetic bf16 shards of a Llama-shaped model with about --params parameters (base, and tuned =
base + noise) into a temp dir, then times, each in a fresh subprocess, cold (the shards' pages dropped
from the page cache with posix_fadvise) and warm:
  read    every tensor of both checkpoints once, in the chunks selection uses (TensorReader, no math)
  raw     both checkpoints' files read sequentially in 8 MiB blocks (the floor for any reader)
  select  find_core_regions(CheckpointDelta(base, tuned), p) at global scope
Peak memory is the anonymous RSS above the level before the call, sampled every 2 ms (file pages
in the page cache are not the process's memory), against the bytes of the largest tensor.
Then times Jaccard and the overlap matrix of two 1% regions of the same model.

    .venv/bin/python bench/regions_select.py                 # 1e9 parameters, p = 0.01
    .venv/bin/python bench/regions_select.py --params 5e7    # quick run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import provenance
import torch

from peft_isolate.files import TensorReader, save_json, save_tensors, write_atomic
from peft_isolate.plan import jaccard, overlap_matrix
from peft_isolate.regions import CoreRegions
from peft_isolate.selection import find_core_regions
from peft_isolate.sources import CheckpointDelta

VOCAB = 32000
SHARD_BYTES = 1 << 30
RESULTS = Path(__file__).parent / "results" / "regions_select.md"


def llama_shapes(params: float) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a Llama (TinyLlama proportions: GQA 8:1, MLP 2.75x) with about `params` entries."""
    hidden = next(h for h in (2048, 1024, 512, 256, 128) if 8 * VOCAB * h <= params or h == 128)
    inter, kv = int(2.75 * hidden) // 64 * 64, hidden // 8
    block = {
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    per_block = sum(math.prod(s) for s in block.values())
    layers = max(1, round((params - 2 * VOCAB * hidden - hidden) / per_block))
    shapes = {"model.embed_tokens.weight": (VOCAB, hidden)}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in block.items()})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (VOCAB, hidden)})
    return shapes


def write_checkpoints(shapes: dict[str, tuple[int, ...]], root: Path) -> None:
    """base/ and tuned/ as HF-style bf16 shards with an index; tuned = base + N(0, 1e-3) noise."""
    g = torch.Generator().manual_seed(0)
    for d in ("base", "tuned"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shard: dict[str, dict[str, torch.Tensor]] = {"base": {}, "tuned": {}}
    weight_map: dict[str, str] = {}
    pending: list[str] = []
    size, k = 0, 0

    def flush() -> None:
        nonlocal size, k
        name = f"model-{k:05d}.safetensors"
        for d in ("base", "tuned"):
            save_tensors(shard[d], root / d / name)
            shard[d] = {}
        weight_map.update(dict.fromkeys(pending, name))
        pending.clear()
        size, k = 0, k + 1

    for name, shape in shapes.items():
        base = torch.randn(shape, generator=g).mul_(0.02)
        tuned = torch.randn(shape, generator=g).mul_(1e-3).add_(base)
        shard["base"][name], shard["tuned"][name] = base.bfloat16(), tuned.bfloat16()
        pending.append(name)
        size += 2 * math.prod(shape)
        if size >= SHARD_BYTES:
            flush()
    if pending:
        flush()
    for d in ("base", "tuned"):
        save_json({"metadata": {}, "weight_map": weight_map}, root / d / "model.safetensors.index.json")


def drop_cache(root: Path) -> None:
    """Evict the shards' (clean) pages from the page cache, so the next read comes from disk."""
    for f in root.rglob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def rss() -> tuple[int, int]:
    """(anonymous RSS, total RSS) of this process in bytes, from /proc."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["RssAnon"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024


def measure(kind: str, root: Path, p: float, chunk: int) -> dict:
    """Run one timed step in this process, sampling RSS; returns seconds and peak memory above the start."""
    start_anon, start_total = rss()
    peak = [start_anon, start_total]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            a, t = rss()
            peak[0], peak[1] = max(peak[0], a), max(peak[1], t)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    extra = {}
    if kind == "read":
        for d in ("base", "tuned"):
            for f in sorted((root / d).glob("*.safetensors")):
                with TensorReader(f) as r:
                    for n in r.names():
                        numel = math.prod(r.shape(n))
                        for s in range(0, numel, chunk):
                            r.read(n, s, min(chunk, numel - s))
    elif kind == "raw":
        buf = bytearray(8 << 20)
        for f in sorted(root.rglob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    else:
        cores = find_core_regions(CheckpointDelta(root / "base", root / "tuned"), p=p, chunk_size=chunk)
        extra = {"size": cores.size, "numel": cores.numel}
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if kind == "select":
        cores.save(root / "cores.safetensors")
    return {"seconds": seconds, "peak_anon": peak[0] - start_anon, "peak_total": peak[1] - start_total, **extra}


def run_child(kind: str, root: Path, p: float, chunk: int, cold: bool) -> dict:
    if cold:
        drop_cache(root)
    cmd = [sys.executable, __file__, "--child", kind, "--root", str(root), "--p", str(p), "--chunk", str(chunk)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def random_like(cores: CoreRegions, seed: int) -> CoreRegions:
    """Another task's regions: per tensor the same number of entries, uniformly at random."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, idx in cores.items():
        numel, count = math.prod(cores.shapes[name]), idx.numel()
        draw = torch.randint(0, numel, (count + count // 10 + 16,), generator=g, dtype=torch.int64).unique()
        while draw.numel() < count:  # rare: too many collisions
            draw = torch.cat([draw, torch.randint(0, numel, (count,), generator=g)]).unique()
        keep = torch.randperm(draw.numel(), generator=g)[:count].sort().values
        out[name] = draw[keep].to(torch.int32)
    return CoreRegions(out, cores.shapes, p=cores.p, scope=cores.scope, source=f"random {seed}")


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1e9, help="approximate parameter count (default 1e9)")
    ap.add_argument("--p", type=float, default=0.01)
    ap.add_argument("--chunk", type=int, default=1 << 20, help="elements per read chunk")
    ap.add_argument("--repeat", type=int, default=2, help="runs per row; the fastest is reported (default 2)")
    ap.add_argument("--dir", help="where to write the shards (default: a temp dir, deleted after)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--child", choices=["read", "raw", "select"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, Path(args.root), args.p, args.chunk)))
        return

    shapes = llama_shapes(args.params)
    total = sum(math.prod(s) for s in shapes.values())
    largest = max(math.prod(s) for s in shapes.values()) * 2  # bf16 bytes
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_checkpoints(shapes, root)
        print(f"wrote 2 x {total / 1e9:.3f}B bf16 parameters in {time.perf_counter() - t0:.0f} s to {root}")
        rows = {}
        for kind in ("raw", "read", "select"):
            for cold in (True, False):
                runs = [run_child(kind, root, args.p, args.chunk, cold) for _ in range(args.repeat)]
                rows[(kind, cold)] = r = min(runs, key=lambda x: x["seconds"])
                state = "cold" if cold else "warm"
                print(f"{kind:6s} {state}: {r['seconds']:.2f} s, peak anon {r['peak_anon'] / 2**20:.0f} MiB")
        cores = CoreRegions.load(root / "cores.safetensors")
    assert cores.size == int(args.p * total), (cores.size, args.p * total)
    other = random_like(cores, 1)
    t_jac = best_of(lambda: jaccard(cores, other))
    t_mat = best_of(lambda: overlap_matrix({"a": cores, "b": other}), repeat=1)
    t_union = best_of(lambda: cores.union(other), repeat=1)
    jac = jaccard(cores, other)

    mib = 2**20
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    sel_c, sel_w = rows[("select", True)], rows[("select", False)]
    read_c, read_w = rows[("read", True)], rows[("read", False)]
    lines = [
        "# Core-region selection from two checkpoints (`bench/regions_select.py`)",
        "",
        f"Command: `.venv/bin/python bench/regions_select.py --params {args.params:g} --p {args.p:g} "
        f"--repeat {args.repeat}`  ",
        f"Machine: {os.cpu_count()} CPU cores, {ram / 2**30:.0f} GiB RAM, "
        f"{platform.platform()}, {provenance.versions()}, no GPU.  ",
        f"Model: Llama-shaped, {total:,} bf16 parameters per checkpoint ({len(shapes)} tensors, "
        f"{2 * total / 2**30:.2f} GiB each, ~1 GiB shards), tuned = base + N(0, 1e-3); largest tensor "
        f"{largest / mib:.0f} MiB. p = {args.p:g}, global scope: exactly {cores.size:,} entries selected. "
        f"Chunk {args.chunk:,} elements. Each row is the fastest of {args.repeat} runs, each in a fresh process; "
        "cold = shard pages dropped "
        "with posix_fadvise(DONTNEED) first (the disk may still have its own cache).",
        "",
        "| step | cold s | warm s | peak anon RSS above start | vs largest tensor |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, label in (
        ("raw", "raw sequential read of both checkpoints (8 MiB blocks)"),
        ("read", "read both checkpoints once, tensor by tensor, in chunks"),
        ("select", "**select top 1% (find_core_regions)**"),
    ):
        c, w = rows[(kind, True)], rows[(kind, False)]
        peak = max(c["peak_anon"], w["peak_anon"])
        lines.append(
            f"| {label} | {c['seconds']:.2f} | {w['seconds']:.2f} | {peak / mib:.0f} MiB | {peak / largest:.2f}x |"
        )
    sel_peak = max(sel_c["peak_anon"], sel_w["peak_anon"])
    sel_total = max(sel_c["peak_total"], sel_w["peak_total"])
    lines += [
        "",
        f"- Selection / read time: **{sel_c['seconds'] / read_c['seconds']:.2f}x cold, "
        f"{sel_w['seconds'] / read_w['seconds']:.2f}x warm** (goal: within 2x).",
        f"- Selection peak memory: **{sel_peak / largest:.2f}x the largest tensor** (goal: under 3x); "
        f"total RSS including mapped file pages peaked {sel_total / mib:.0f} MiB above start.",
        f"- Jaccard of two 1% regions ({cores.size:,} and {other.size:,} entries over {total:,} parameters): "
        f"**{t_jac * 1000:.0f} ms** (best of 3); overlap matrix of the two {t_mat * 1000:.0f} ms; "
        f"union {t_union * 1000:.0f} ms. J = {jac:.4f} (the second region is random with the same per-tensor "
        "counts).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    write_atomic(args.out, lambda path: path.write_text(text))


if __name__ == "__main__":
    main()
