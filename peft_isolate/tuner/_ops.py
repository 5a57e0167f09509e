"""The sparse-delta linear product and its backward, without a dense out x in delta or weight gradient.

A delta is a set of sorted flat positions into an `[out, in]` weight with one value each. Sorted flat positions
are exactly the row-major order of a CSR matrix, so the CSR structure is two cheap ops away: columns are
`idx % in`, row pointers a `searchsorted`. Forward and the input gradient are sparse-dense products (CSR of the
delta and of its transpose); the value gradient is the weight gradient sampled at the support (SDDMM),
`torch.sparse.sampled_addmm`. The structures depend only on the index sets, so a layer builds them once
(`delta_pattern`) and every step reuses them: per entry 4 bytes of columns, 4 of transposed columns and 8 of
transposed order, plus 8 of joined order and 4 of trainable columns while a frozen part exists.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

# CSR support is "beta" in torch and says so; the invariants are ours to keep (sorted unique in-range indices,
# checked when an index set enters a layer), so torch's own per-call checks stay off.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

_SPARSE_DTYPES = (torch.float32, torch.float64)


def _csr_structure(indices: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row pointers and columns of the `[out, in]` CSR matrix whose entries sit at the sorted flat `indices`."""
    out_features, in_features = shape
    row_starts = torch.arange(out_features + 1, device=indices.device, dtype=torch.int64) * in_features
    crow = torch.searchsorted(indices, row_starts.to(indices.dtype), out_int32=True)
    return crow, (indices % in_features).to(torch.int32)


def _csr(structure: tuple[torch.Tensor, torch.Tensor], values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_csr_tensor(*structure, values, shape, check_invariants=False)


@dataclass(frozen=True)
class DeltaPattern:
    """The sparsity structure of one delta (a trainable and a frozen part on disjoint index sets), which stays
    fixed while the index sets do: built once per change, reused by every step.

    It holds the CSR structure of the joined delta, of its transpose (the input gradient is then a CSR product
    as well; torch's product with a transposed CSR is 1.5x slower on CPU) and of the trainable part (the pattern
    of the value gradient), plus the permutations that put the values into joined and transposed order."""

    shape: tuple[int, int]
    joined: tuple[torch.Tensor, torch.Tensor]
    joined_order: torch.Tensor | None  # joined position -> position in cat(values, frozen values); None: no frozen
    transposed: tuple[torch.Tensor, torch.Tensor]
    transposed_order: torch.Tensor  # transposed position -> joined position
    trainable: tuple[torch.Tensor, torch.Tensor]

    def joined_values(self, values: torch.Tensor, frozen_values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.joined_order is None:
            return values.to(dtype)
        return torch.cat([values.to(dtype), frozen_values.to(dtype)])[self.joined_order]


def delta_pattern(indices: torch.Tensor, frozen_indices: torch.Tensor, shape: tuple[int, int]) -> DeltaPattern:
    """The DeltaPattern of the sorted disjoint flat index sets `indices` (trainable) and `frozen_indices`."""
    out_features, in_features = shape
    trainable = _csr_structure(indices, shape)
    joined, joined_order, joined_structure = indices, None, trainable
    if frozen_indices.numel():
        joined, joined_order = torch.sort(torch.cat([indices, frozen_indices]))
        joined_structure = _csr_structure(joined, shape)
    flat = joined.long()
    transposed_flat, transposed_order = torch.sort((flat % in_features) * out_features + flat // in_features)
    return DeltaPattern(
        shape=(out_features, in_features),
        joined=joined_structure,
        joined_order=joined_order,
        transposed=_csr_structure(transposed_flat, (in_features, out_features)),
        transposed_order=transposed_order,
        trainable=trainable,
    )


class _SparseDeltaLinear(torch.autograd.Function):
    """y = x @ Delta^T for Delta = trainable part + frozen part (disjoint); gradients for x and trainable values."""

    @staticmethod
    def forward(ctx, x, values, frozen_values, pattern: DeltaPattern):
        compute_dtype = x.dtype if x.dtype in _SPARSE_DTYPES else torch.float32
        out_features, in_features = pattern.shape
        x2d = x.reshape(-1, in_features)
        joined_values = pattern.joined_values(values, frozen_values, compute_dtype)
        y = torch.sparse.mm(_csr(pattern.joined, joined_values, pattern.shape), x2d.to(compute_dtype).T).T
        ctx.pattern, ctx.compute_dtype, ctx.values_dtype = pattern, compute_dtype, values.dtype
        ctx.save_for_backward(x2d if ctx.needs_input_grad[1] else None, joined_values)
        return y.reshape(*x.shape[:-1], out_features).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x2d, joined_values = ctx.saved_tensors
        pattern, dtype = ctx.pattern, ctx.compute_dtype
        g2d = grad_out.reshape(-1, pattern.shape[0]).to(dtype)
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_gradient(pattern, joined_values, g2d).reshape(*grad_out.shape[:-1], pattern.shape[1])
            grad_x = grad_x.to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            zeros = torch.zeros(pattern.trainable[1].numel(), dtype=dtype, device=g2d.device)
            sample = _csr(pattern.trainable, zeros, pattern.shape)
            grad_values = torch.sparse.sampled_addmm(sample, g2d.T, x2d.to(dtype), beta=0.0).values()
            grad_values = grad_values.to(ctx.values_dtype)
        return grad_x, grad_values, None, None


def _input_gradient(pattern: DeltaPattern, joined_values: torch.Tensor, g2d: torch.Tensor) -> torch.Tensor:
    """`g2d @ Delta` as a product with the transpose's own CSR (faster than torch's product with a transposed CSR)."""
    out_features, in_features = pattern.shape
    delta_t = _csr(pattern.transposed, joined_values[pattern.transposed_order], (in_features, out_features))
    return torch.sparse.mm(delta_t, g2d.T).T


def sparse_delta_linear(
    x: torch.Tensor, values: torch.Tensor, frozen_values: torch.Tensor, pattern: DeltaPattern
) -> torch.Tensor:
    """`x @ Delta^T` for the sparse `[out, in]` delta with trainable `values` and `frozen_values` at `pattern`.

    Gradients flow to `x` and to the trainable `values`, never to the frozen part. Keeps `x` (a view of what the
    base layer keeps) and the joined values for backward.
    """
    if pattern.joined[1].numel() == 0:
        return x.new_zeros(*x.shape[:-1], pattern.shape[0])
    return _SparseDeltaLinear.apply(x, values, frozen_values, pattern)


def dense_delta(
    indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """The delta as a dense `[out, in]` tensor (for merging and for reference checks)."""
    flat = torch.zeros(shape[0] * shape[1], dtype=dtype, device=values.device)
    flat[indices.long()] = values.to(dtype)
    return flat.view(shape)
