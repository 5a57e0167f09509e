"""The value gradient of one layer on its own (CUDA): `(g^T @ x)` at the support, three ways.

- `triton`: the SDDMM kernel the layer uses on CUDA (`peft_isolate.tuner._sddmm`), bf16 activations in;
- `cusparse`: torch's `sampled_addmm` on a CSR pattern (cuSPARSE), which takes fp32 only, conversions included;
- `dense`: the full `out x in` weight gradient on the tensor cores, then its entries at the support.

Time is the median of CUDA-event timings after warm-up; memory is the peak above the inputs. Shapes are the
linear layers of the 1.1B Llama that `bench/speed.py --shape 1b` times; tokens = batch x sequence length.

    python bench/value_gradient.py --tokens 1024 4096 --density 0.001 0.01 0.05
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from peft_isolate.tuner import _sddmm
from peft_isolate.tuner._ops import DeltaPattern

RESULTS = Path(__file__).parent / "results"
SHAPES = [(2048, 2048), (5632, 2048), (2048, 5632)]  # q/o, gate/up, down projections of the 1b shape


def _methods(g, x, indices, shape):
    pattern = DeltaPattern(indices, torch.zeros(0, dtype=indices.dtype, device=indices.device), shape)
    sample = torch.sparse_csr_tensor(*pattern.trainable, torch.zeros(indices.numel(), device=g.device), shape)
    return {
        "triton": lambda: _sddmm.sampled_product(g, x, indices, shape[1]),
        "cusparse": lambda: torch.sparse.sampled_addmm(sample, g.T.float(), x.float(), beta=0.0).values(),
        "dense": lambda: (g.T @ x).flatten()[indices.long()].float(),
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
        f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}, date {time.strftime('%Y-%m-%d')}; "
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
                results = {name: _measure(fn, args.repeats) for name, fn in _methods(g, x, indices, shape).items()}
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
