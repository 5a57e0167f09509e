"""The sparse-delta linear products and their backward, without a dense out x in delta or weight gradient kept.

A delta is a set of sorted flat positions into an `[out, in]` weight with one value each. Sorted flat positions
are exactly the row-major order of a CSR matrix, so the CSR structure is two cheap ops away: columns are
`idx % in`, row pointers a `searchsorted`. The value gradient is the weight gradient at the support: on CPU
sampled there only (SDDMM, `torch.sparse.sampled_addmm`), never the full `out x in` one; on CUDA the full one on
the tensor cores, then gathered and freed, which measured faster than any sampled product there and no larger
(bench/value_gradient.py: a Triton SDDMM 1.2-5.5x and cuSPARSE's 3-70x slower on an H200).

Two forward products share it:
- `merged_delta_linear` (training): the frozen base weight is rebuilt densely, the delta scattered into it, one
  dense product; backward rebuilds it again. bitsandbytes' 4-bit matmul dequantizes the same way in its forward
  and backward, so base plus delta cost one product plus a scatter of the support, and nothing `out x in` is kept.
- `sparse_delta_linear` (inference, other bases): `x @ Delta^T` as a CSR product added to the base layer's output,
  which keeps the base layer's own kernels (bitsandbytes' single-row and packed CPU kernels, int8 matmuls).

The structures depend only on the index sets, so a layer builds them once (`DeltaPattern`) and every step reuses
them: per trainable entry 4 bytes of CSR columns (and 4 per weight row); the joined and transposed structures of
the CSR product (4 + 4 + 8 bytes per entry, 8 more while a frozen part exists) are built the first time that
product runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import cached_property

import torch

_SPARSE_DTYPES = (torch.float32, torch.float64)


def _csr_structure(indices: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row pointers and columns of the `[out, in]` CSR matrix whose entries sit at the sorted flat `indices`."""
    out_features, in_features = shape
    row_starts = torch.arange(out_features + 1, device=indices.device, dtype=torch.int64) * in_features
    crow = torch.searchsorted(indices, row_starts.to(indices.dtype), out_int32=True)
    return crow, (indices % in_features).to(torch.int32)


def _csr(structure: tuple[torch.Tensor, torch.Tensor], values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """CSR support is "beta" in torch and says so on every creation; the invariants are ours to keep (sorted
    unique in-range indices, checked when an index set enters a layer), so torch's per-call checks stay off."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(*structure, values, shape, check_invariants=False)


class DeltaPattern:
    """The sparsity structure of one delta (a trainable and a frozen part on disjoint sorted index sets), which
    stays fixed while the index sets do: built once per change, reused by every step.

    `trainable` (the pattern of the value gradient) is built at once; the structures of the CSR product, the
    joined delta's and its transpose's (the input gradient is then a CSR product too, 1.5x faster on CPU than
    torch's product with a transposed CSR), on first use."""

    def __init__(self, indices: torch.Tensor, frozen_indices: torch.Tensor, shape: tuple[int, int]) -> None:
        self.indices, self.frozen_indices, self.shape = indices, frozen_indices, shape
        self.trainable = _csr_structure(indices, shape)

    @property
    def empty(self) -> bool:
        return self.indices.numel() + self.frozen_indices.numel() == 0

    def add_to(self, weight: torch.Tensor, values: torch.Tensor, frozen_values: torch.Tensor) -> torch.Tensor:
        """`weight` (a dense `[out, in]` tensor of its own) plus the delta, in place."""
        flat = weight.view(-1)
        flat.index_add_(0, self.indices.long(), values.to(flat.dtype))
        flat.index_add_(0, self.frozen_indices.long(), frozen_values.to(flat.dtype))
        return weight

    @cached_property
    def _joined(self) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """CSR structure of trainable + frozen, and joined position -> position in cat(values, frozen values)."""
        if not self.frozen_indices.numel():
            return self.trainable, None
        joined, order = torch.sort(torch.cat([self.indices, self.frozen_indices]))
        return _csr_structure(joined, self.shape), order

    @cached_property
    def _transposed(self) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """CSR structure of the joined delta's transpose, and transposed position -> joined position."""
        out_features, in_features = self.shape
        crow, col = self._joined[0]
        rows = torch.repeat_interleave(torch.arange(out_features, device=col.device), crow.diff())
        flat_t, order = torch.sort(col.long() * out_features + rows)
        return _csr_structure(flat_t, (in_features, out_features)), order

    def joined_values(self, values: torch.Tensor, frozen_values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Both parts' values in the joined CSR order."""
        order = self._joined[1]
        if order is None:
            return values.to(dtype)
        return torch.cat([values.to(dtype), frozen_values.to(dtype)])[order]

    def joined_csr(self, joined_values: torch.Tensor) -> torch.Tensor:
        """The delta as a CSR `[out, in]` tensor."""
        return _csr(self._joined[0], joined_values, self.shape)

    def transposed_csr(self, joined_values: torch.Tensor) -> torch.Tensor:
        """The delta's transpose as a CSR `[in, out]` tensor."""
        structure, order = self._transposed
        return _csr(structure, joined_values[order], self.shape[::-1])

    def value_gradient(self, g2d: torch.Tensor, x2d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`(g2d^T @ x2d)` at the trainable entries, in `dtype`: sampled (SDDMM) on CPU, gathered on CUDA."""
        if g2d.is_cuda:
            return (g2d.T @ x2d.to(g2d.dtype)).flatten()[self.indices.long()].to(dtype)
        compute = g2d.dtype if g2d.dtype in _SPARSE_DTYPES else torch.float32
        zeros = torch.zeros(self.indices.numel(), dtype=compute, device=g2d.device)
        sample = _csr(self.trainable, zeros, self.shape)
        return torch.sparse.sampled_addmm(sample, g2d.T.to(compute), x2d.to(compute), beta=0.0).values().to(dtype)


class _SparseDeltaLinear(torch.autograd.Function):
    """y = x @ Delta^T for Delta = trainable part + frozen part; gradients for x and the trainable values."""

    @staticmethod
    def forward(ctx, x, values, frozen_values, pattern: DeltaPattern):
        compute_dtype = x.dtype if x.dtype in _SPARSE_DTYPES else torch.float32
        out_features, in_features = pattern.shape
        x2d = x.reshape(-1, in_features)
        joined_values = pattern.joined_values(values, frozen_values, compute_dtype)
        y = torch.sparse.mm(pattern.joined_csr(joined_values), x2d.to(compute_dtype).T).T
        ctx.pattern, ctx.compute_dtype, ctx.values_dtype = pattern, compute_dtype, values.dtype
        ctx.save_for_backward(x2d if ctx.needs_input_grad[1] else None, joined_values)
        return y.reshape(*x.shape[:-1], out_features).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x2d, joined_values = ctx.saved_tensors
        pattern = ctx.pattern
        g2d = grad_out.reshape(-1, pattern.shape[0]).to(ctx.compute_dtype)
        grad_x = grad_values = None
        with torch.autocast(grad_out.device.type, enabled=False):  # a backward called under autocast
            if ctx.needs_input_grad[0]:
                grad_x = torch.sparse.mm(pattern.transposed_csr(joined_values), g2d.T).T
                grad_x = grad_x.reshape(*grad_out.shape[:-1], pattern.shape[1]).to(grad_out.dtype)
            if ctx.needs_input_grad[1]:
                grad_values = pattern.value_gradient(g2d, x2d, ctx.values_dtype)
        return grad_x, grad_values, None, None


def sparse_delta_linear(
    x: torch.Tensor, values: torch.Tensor, frozen_values: torch.Tensor, pattern: DeltaPattern
) -> torch.Tensor:
    """`x @ Delta^T` for the sparse `[out, in]` delta with trainable `values` and `frozen_values` at `pattern`.

    Gradients flow to `x` and to the trainable `values`, never to the frozen part. Keeps `x` (a view of what the
    base layer keeps) and the joined values for backward.
    """
    if pattern.empty:
        return x.new_zeros(*x.shape[:-1], pattern.shape[0])
    with torch.autocast(x.device.type, enabled=False):  # autocast would cast to bf16, which CPU CSR products lack
        return _SparseDeltaLinear.apply(x, values, frozen_values, pattern)


class _MergedDeltaLinear(torch.autograd.Function):
    """y = x @ (W + Delta)^T + b with the frozen W rebuilt by `base_weight` in forward and again in backward."""

    @staticmethod
    def forward(ctx, x, values, frozen_values, bias, pattern: DeltaPattern, base_weight):
        weight = pattern.add_to(base_weight(), values, frozen_values)
        y = torch.nn.functional.linear(x, weight, bias)
        ctx.pattern, ctx.base_weight, ctx.product_dtype = pattern, base_weight, y.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, values, frozen_values)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, values, frozen_values = ctx.saved_tensors
        pattern, dtype = ctx.pattern, ctx.product_dtype
        g2d = grad_out.reshape(-1, pattern.shape[0]).to(dtype)
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = pattern.add_to(ctx.base_weight(), values, frozen_values).to(dtype)
            grad_x = (g2d @ weight).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_values = pattern.value_gradient(g2d, x.reshape(-1, pattern.shape[1]), values.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = g2d.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_values, None, grad_bias, None, None


def merged_delta_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    frozen_values: torch.Tensor,
    bias: torch.Tensor | None,
    pattern: DeltaPattern,
    base_weight: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """`x @ (W + Delta)^T + bias`, where `base_weight()` returns a new dense copy of the frozen base weight W (in
    the product's dtype) each call: one for forward, one for backward. Gradients flow to `x`, the trainable
    `values` and `bias`; keeps `x` and the values, as a LoRA layer keeps its input."""
    return _MergedDeltaLinear.apply(x, values, frozen_values, bias, pattern, base_weight)


def dense_delta(
    indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """The delta as a dense `[out, in]` tensor (for merging and for reference checks)."""
    flat = torch.zeros(shape[0] * shape[1], dtype=dtype, device=values.device)
    flat[indices.long()] = values.to(dtype)
    return flat.view(shape)
