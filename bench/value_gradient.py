"""The value gradient of one layer on its own (CUDA): `(g^T @ x)` at the support, three ways.

- `triton`: a sampled dense-dense product (SDDMM) in Triton below: one fp32 dot product over the tokens per
  entry, reading only the entry's row of `g^T` and column of `x` (made contiguous first), bf16 activations in;
- `cusparse`: torch's `sampled_addmm` on a CSR pattern (cuSPARSE), which takes fp32 only, conversions included;
- `dense`: the full `out x in` weight gradient on the tensor cores, then its entries at the support; what the
  layer does on CUDA (`DeltaPattern.value_gradient`), since it measured fastest here and no larger.

Each is checked against a float64 reference before it is timed.

Time is the median of CUDA-event timings after warm-up; memory is the peak above the inputs. Shapes are the
linear layers of the 1.1B Llama that `bench/speed.py --shape 1b` times; tokens = batch x sequence length.

    python bench/value_gradient.py --tokens 1024 4096 --density 0.001 0.01 0.05
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import provenance
import torch
import triton
import triton.language as tl

from peft_isolate.tuner.ops import DeltaPattern

RESULTS = Path(__file__).parent / "results"
SHAPES = [(2048, 2048), (5632, 2048), (2048, 5632)]  # q/o, gate/up, down projections of the 1b shape


@triton.autotune(
    configs=[
        triton.Config({"BLOCK_N": n, "BLOCK_T": t}, num_warps=w)
        for n, t, w in [(32, 128, 4), (64, 64, 4), (128, 32, 4), (64, 128, 8)]
    ],
    key=["tokens"],
)
@triton.jit
def _sampled_product_kernel(
    gt_ptr, xt_ptr, idx_ptr, out_ptr, nnz, tokens, in_features, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < nnz
    idx = tl.load(idx_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    g_rows = gt_ptr + (idx // in_features)[:, None] * tokens
    x_rows = xt_ptr + (idx % in_features)[:, None] * tokens
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t0 in range(0, tokens, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = mask_n[:, None] & (offs_t < tokens)[None, :]
        g = tl.load(g_rows + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_rows + offs_t[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(g * x, axis=1)
    tl.store(out_ptr + offs_n, acc, mask=mask_n)


def sampled_product(g2d: torch.Tensor, x2d: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """`(g2d^T @ x2d).flatten()[indices]` in fp32 for `g2d: [tokens, out]`, `x2d: [tokens, in]`."""
    out = torch.empty(indices.numel(), dtype=torch.float32, device=g2d.device)
    if not indices.numel():
        return out
    tokens = g2d.shape[0]
    gt, xt = g2d.T.contiguous(), x2d.T.to(g2d.dtype).contiguous()  # entry rows become contiguous token runs

    def grid(meta):
        return (triton.cdiv(indices.numel(), meta["BLOCK_N"]),)

    _sampled_product_kernel[grid](gt, xt, indices, out, indices.numel(), tokens, in_features)
    return out


def _methods(g, x, indices, shape):
    pattern = DeltaPattern(indices, torch.zeros(0, dtype=indices.dtype, device=indices.device), shape)
    sample = torch.sparse_csr_tensor(*pattern.trainable, torch.zeros(indices.numel(), device=g.device), shape)
    return {
        "triton": lambda: sampled_product(g, x, indices, shape[1]),
        "cusparse": lambda: torch.sparse.sampled_addmm(sample, g.T.float(), x.float(), beta=0.0).values(),
        "dense": lambda: pattern.value_gradient(g, x, torch.float32),
    }


def _measure(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up (Triton compiles and autotunes here)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--density", type=float, nargs="+", default=[0.001, 0.01, 0.05])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=str(RESULTS / "value_gradient_gpu.md"))
    args = p.parse_args()
    device = torch.device("cuda")
    lines = [
        f"Device: {provenance.device()}, {provenance.versions()}, date {time.strftime('%Y-%m-%d')}; "
        f"bf16 activations, median of {args.repeats} timings.",
        "Command: `python bench/value_gradient.py --tokens "
        + " ".join(map(str, args.tokens))
        + " --density "
        + " ".join(map(str, args.density))
        + "`",
        "",
        "| out x in | tokens | density | triton (ms) | cusparse (ms) | dense (ms) | triton x dense "
        "| triton / cusparse / dense extra mem (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    gen = torch.Generator(device=device).manual_seed(0)
    for shape in SHAPES:
        for tokens in args.tokens:
            g = torch.randn(tokens, shape[0], device=device, generator=gen, dtype=torch.bfloat16)
            x = torch.randn(tokens, shape[1], device=device, generator=gen, dtype=torch.bfloat16)
            for density in args.density:
                numel = shape[0] * shape[1]
                perm = torch.randperm(numel, device=device, generator=gen)
                indices = perm[: int(density * numel)].sort().values.to(torch.int32)
                methods = _methods(g, x, indices, shape)
                want = (g.double().T @ x.double()).flatten()[indices.long()]
                for name, fn in methods.items():
                    torch.testing.assert_close(fn().double(), want, rtol=1e-2, atol=0.5, msg=name)  # bf16 rounding
                results = {name: _measure(fn, args.repeats) for name, fn in methods.items()}
                (t_tri, m_tri), (t_cus, m_cus), (t_den, m_den) = results.values()
                lines.append(
                    f"| {shape[0]} x {shape[1]} | {tokens} | {density:.1%} | {t_tri:.3f} | {t_cus:.3f} | "
                    f"{t_den:.3f} | {t_tri / t_den:.2f} | {m_tri:.0f} / {m_cus:.0f} / {m_den:.0f} |"
                )
                print(lines[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
