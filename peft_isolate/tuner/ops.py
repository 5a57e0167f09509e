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

A structured support (whole rows, columns or blocks, as structured core regions give, less any locked holes) takes
a shorter way to the value gradient: the dense product over the units alone (`GradientCover`), whose cost follows
the support's size, not the weight's; for columns and blocks backward keeps only the input columns it reads.

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

from ..regions import BLOCK_SIZES, unit_of

_SPARSE_DTYPES = (torch.float32, torch.float64)
# a cover is taken while its product holds at most this many entries per trainable one (units at least an eighth
# full, holes included) and at most half the weight; past that the sampled or full product is as cheap
_COVER_FILL = 8


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


class GradientCover:
    """Units of one granularity (rows, columns or `block` x `block` blocks, edge blocks cut) that hold every
    trainable entry, and where each entry sits in their dense weight-gradient product: `g[:, rows]^T @ x`,
    `g^T @ x[:, cols]`, or one `g[:, block rows]^T @ x[:, block cols]` per block (a batched product). Entries of a
    unit that are not trainable (locked or held holes) are computed and never read."""

    def __init__(self, indices: torch.Tensor, shape: tuple[int, int], granularity: str, block: int | None = None):
        out_features, in_features = shape
        flat = indices.long()
        rows, cols = flat // in_features, flat % in_features
        unit = unit_of(flat, shape, granularity, block)
        self.units, position = torch.unique(unit, return_inverse=True)
        self.granularity, self.block, self.columns = granularity, block, None
        if granularity == "row":
            self.local = position * in_features + cols
            self.size = self.units.numel() * in_features
        elif granularity == "column":
            self.local, self.columns = rows * self.units.numel() + position, self.units
            self.size = self.units.numel() * out_features
        else:
            per_row, side = -(-in_features // block), torch.arange(block, device=flat.device)
            self.unit_rows = ((self.units // per_row)[:, None] * block + side).clamp(max=out_features - 1).flatten()
            unit_cols = ((self.units % per_row)[:, None] * block + side).clamp(max=in_features - 1).flatten()
            self.columns, self.unit_cols = torch.unique(unit_cols, return_inverse=True)
            self.local = (position * block + rows % block) * block + cols % block
            self.size = self.units.numel() * block * block
        if self.columns is not None and 2 * self.columns.numel() > in_features:  # keeping all of x is as cheap
            if granularity == "block":
                self.unit_cols = self.columns[self.unit_cols]
            self.columns = None
        self.local = self.local.to(torch.int32)  # as many bytes as the CSR columns it replaces

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """What backward needs of the input `[..., in]`: `x` itself, or the columns the product reads as `[n, c]`."""
        return x if self.columns is None else x.reshape(-1, x.shape[-1]).index_select(1, self.columns)

    def gradient(self, g2d: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The weight gradient `g2d^T @ x` at the trainable entries, from what `keep` kept of `x`."""
        kept = kept.to(g2d.dtype)
        if self.granularity == "row":
            product = g2d.index_select(1, self.units).T @ kept
        elif self.granularity == "column":
            product = g2d.T @ kept if self.columns is not None else g2d.T @ kept.index_select(1, self.units)
        else:
            n, units = g2d.shape[0], self.units.numel()
            g = g2d.index_select(1, self.unit_rows).view(n, units, self.block).permute(1, 2, 0)
            x = kept.index_select(1, self.unit_cols).view(n, units, self.block).transpose(0, 1)
            product = torch.bmm(g, x)
        return product.flatten()[self.local]


def gradient_cover(indices: torch.Tensor, shape: tuple[int, int]) -> GradientCover | None:
    """The cheapest cover of the trainable entries by rows, columns or blocks of a side in `BLOCK_SIZES`, or None
    when none is small enough to beat the sampled product (`_COVER_FILL`): an unstructured support touches
    nearly every row, column and block."""
    if not indices.numel():
        return None
    covers = [GradientCover(indices, shape, g) for g in ("row", "column")]
    covers += [GradientCover(indices, shape, "block", b) for b in reversed(BLOCK_SIZES) if b < max(shape)]
    best = min(covers, key=lambda cover: cover.size)  # the first of equal size: fewer, larger products
    fits = best.size <= _COVER_FILL * indices.numel() and 2 * best.size <= shape[0] * shape[1]
    return best if fits else None


class DeltaPattern:
    """The sparsity structure of one delta (a trainable and a frozen part on disjoint sorted index sets), which
    stays fixed while the index sets do: built once per change, reused by every step.

    `trainable` (the pattern of the value gradient) is built at once; the structures of the CSR product, the
    joined delta's and its transpose's (the input gradient is then a CSR product too, 1.5x faster on CPU than
    torch's product with a transposed CSR), on first use."""

    def __init__(self, indices: torch.Tensor, frozen_indices: torch.Tensor, shape: tuple[int, int]) -> None:
        self.indices, self.frozen_indices, self.shape = indices, frozen_indices, shape
        self.cover = gradient_cover(indices, shape)
        self.trainable = None if self.cover else _csr_structure(indices, shape)

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
            return self.trainable or _csr_structure(self.indices, self.shape), None
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

    def keep_input(self, x: torch.Tensor) -> torch.Tensor:
        """What backward keeps of the input `x` for the value gradient: `x` itself (often kept anyway by the base
        layer), or for a column or block cover only the columns its product reads."""
        return x if self.cover is None else self.cover.keep(x)

    def value_gradient(self, g2d: torch.Tensor, kept: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`(g2d^T @ x)` at the trainable entries, in `dtype`, from `keep_input(x)`: over a structured support's
        units (`GradientCover`), else sampled (SDDMM) on CPU and gathered from the full product on CUDA."""
        x2d = kept.reshape(g2d.shape[0], -1)
        if self.cover is not None:
            return self.cover.gradient(g2d, x2d).to(dtype)
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
        ctx.save_for_backward(pattern.keep_input(x2d) if ctx.needs_input_grad[1] else None, joined_values)
        return y.reshape(*x.shape[:-1], out_features).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        kept, joined_values = ctx.saved_tensors
        pattern = ctx.pattern
        g2d = grad_out.reshape(-1, pattern.shape[0]).to(ctx.compute_dtype)
        grad_x = grad_values = None
        with torch.autocast(grad_out.device.type, enabled=False):  # a backward called under autocast
            if ctx.needs_input_grad[0]:
                grad_x = torch.sparse.mm(pattern.transposed_csr(joined_values), g2d.T).T
                grad_x = grad_x.reshape(*grad_out.shape[:-1], pattern.shape[1]).to(grad_out.dtype)
            if ctx.needs_input_grad[1]:
                grad_values = pattern.value_gradient(g2d, kept, ctx.values_dtype)
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
        ctx.bias_dtype, ctx.x_shape, ctx.x_dtype = None if bias is None else bias.dtype, x.shape, x.dtype
        ctx.save_for_backward(pattern.keep_input(x) if ctx.needs_input_grad[1] else None, values, frozen_values)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        kept, values, frozen_values = ctx.saved_tensors
        pattern, dtype = ctx.pattern, ctx.product_dtype
        g2d = grad_out.reshape(-1, pattern.shape[0]).to(dtype)
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = pattern.add_to(ctx.base_weight(), values, frozen_values).to(dtype)
            grad_x = (g2d @ weight).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_values = pattern.value_gradient(g2d, kept, values.dtype)
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
    `values` and `bias`; keeps `x` (for a column or block support only the columns it needs) and the values, as a
    LoRA layer keeps its input."""
    return _MergedDeltaLinear.apply(x, values, frozen_values, bias, pattern, base_weight)


def dense_delta(
    indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """The delta as a dense `[out, in]` tensor (for merging and for reference checks)."""
    flat = torch.zeros(shape[0] * shape[1], dtype=dtype, device=values.device)
    flat[indices.long()] = values.to(dtype)
    return flat.view(shape)
