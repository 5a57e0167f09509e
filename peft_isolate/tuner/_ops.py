"""The sparse-delta linear product and its backward, without a dense out x in delta or weight gradient.

A delta is a set of sorted flat positions into an `[out, in]` weight with one value each. Sorted flat positions
are exactly the row-major order of a CSR matrix, so the CSR structure is two cheap ops away: columns are
`idx % in`, row pointers a `searchsorted`. Forward and the input gradient are sparse-dense products; the value
gradient is the weight gradient sampled at the support (SDDMM), `torch.sparse.sampled_addmm`.
"""

from __future__ import annotations

import warnings

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
    return crow, indices % in_features


def _csr(structure: tuple[torch.Tensor, torch.Tensor], values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_csr_tensor(*structure, values, shape, check_invariants=False)


class _SparseDeltaLinear(torch.autograd.Function):
    """y = x @ Delta^T for Delta = trainable part + frozen part (disjoint); gradients for x and trainable values.

    The joined delta's CSR structure is built once in forward and kept for backward (it is the size of the
    adapter, small next to the activations), so backward neither re-sorts nor re-searches the index sets."""

    @staticmethod
    def forward(ctx, x, indices, values, frozen_indices, frozen_values, shape):
        compute_dtype = x.dtype if x.dtype in _SPARSE_DTYPES else torch.float32
        x2d = x.reshape(-1, shape[1])
        joined, joined_values = _joined(indices, values, frozen_indices, frozen_values, compute_dtype)
        crow, col = _csr_structure(joined, shape)
        y = torch.sparse.mm(_csr((crow, col), joined_values, shape), x2d.to(compute_dtype).T).T
        ctx.shape, ctx.compute_dtype, ctx.values_dtype = shape, compute_dtype, values.dtype
        ctx.save_for_backward(x2d if ctx.needs_input_grad[2] else None, indices, crow, col, joined_values)
        return y.reshape(*x.shape[:-1], shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x2d, indices, crow, col, joined_values = ctx.saved_tensors
        shape, dtype = ctx.shape, ctx.compute_dtype
        g2d = grad_out.reshape(-1, shape[0]).to(dtype)
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            delta = _csr((crow, col), joined_values, shape)
            grad_x = torch.sparse.mm(delta.t(), g2d.T).T.reshape(*grad_out.shape[:-1], shape[1]).to(grad_out.dtype)
        if ctx.needs_input_grad[2]:
            zeros = torch.zeros(indices.numel(), dtype=dtype, device=indices.device)
            pattern = _csr(_csr_structure(indices, shape), zeros, shape)
            grad_values = torch.sparse.sampled_addmm(pattern, g2d.T, x2d.to(dtype), beta=0.0).values()
            grad_values = grad_values.to(ctx.values_dtype)
        return grad_x, None, grad_values, None, None, None


def _joined(indices, values, frozen_indices, frozen_values, dtype):
    """Both parts as one sorted index set with its values in `dtype`."""
    if frozen_indices.numel() == 0:
        return indices, values.to(dtype)
    if indices.numel() == 0:
        return frozen_indices, frozen_values.to(dtype)
    joined, order = torch.sort(torch.cat([indices, frozen_indices]))
    return joined, torch.cat([values.to(dtype), frozen_values.to(dtype)])[order]


def sparse_delta_linear(
    x: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    frozen_indices: torch.Tensor,
    frozen_values: torch.Tensor,
    shape: tuple[int, int],
) -> torch.Tensor:
    """`x @ Delta^T` for the sparse `[out, in]` delta of a trainable part and a frozen part on disjoint supports.

    Gradients flow to `x` and to the trainable `values`, never to the frozen part. Keeps only `x` for backward.
    """
    if indices.numel() + frozen_indices.numel() == 0:
        return x.new_zeros(*x.shape[:-1], shape[0])
    return _SparseDeltaLinear.apply(x, indices, values, frozen_indices, frozen_values, tuple(shape))


def dense_delta(
    indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """The delta as a dense `[out, in]` tensor (for merging and for reference checks)."""
    flat = torch.zeros(shape[0] * shape[1], dtype=dtype, device=values.device)
    flat[indices.long()] = values.to(dtype)
    return flat.view(shape)
