"""The value gradient on CUDA: a Triton sampled dense-dense product (SDDMM) over a delta's support.

`g^T @ x` at the support only: one fp32 dot product over the tokens per entry, reading the entry's row of `g^T`
and column of `x` and nothing else, in the activations' own dtype (bf16 included; torch's cuSPARSE
`sampled_addmm` takes fp32 only). Row and column come from the flat position, so the kernel needs no CSR
structure. Without Triton (CPU installs) `available` is False and the caller takes torch's CPU SDDMM.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def available(t: torch.Tensor) -> bool:
    """Whether the Triton kernel can take `t` (a CUDA tensor, Triton installed)."""
    return triton is not None and t.is_cuda


if triton is not None:

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
