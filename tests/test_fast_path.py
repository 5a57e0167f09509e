"""The structured fast path: a support of whole rows, columns or blocks (less locked holes) takes its value gradient
from the units' dense product, and backward keeps only the input columns it reads; against a float64 dense
reference, for both products, in fp32 and bf16, with holes, empty and full units and non-contiguous inputs."""

from __future__ import annotations

import pytest
import torch

from peft_isolate.regions import unit_entries
from peft_isolate.tuner.ops import DeltaPattern, dense_delta, merged_delta_linear, sparse_delta_linear

# (shape, granularity, block, units): 128 x 96 divides every block side; 100 x 70 leaves cut edge blocks
CASES = [
    ((128, 96), "row", None, [3, 4, 77]),
    ((128, 96), "column", None, [0, 50, 95]),
    ((128, 96), "block", 16, [0, 7, 40]),
    # 4 x 3 blocks of 32: 3 is (1, 0), 11 the cut 4 x 6 corner (3, 2), which one 16-block covers: 16 is cheaper
    ((100, 70), "block", 32, [3, 11]),
    ((100, 70), "row", None, [99]),
]
IDS = ["rows", "columns", "blocks16", "edge_blocks32", "last_row"]


def _support(shape, granularity, block, units, holes=0.2, seed=0):
    """The units' entries split into trainable and frozen (`holes` of them, at random), and random values."""
    gen = torch.Generator().manual_seed(seed)
    entries = unit_entries(torch.tensor(units), shape, granularity, block)
    frozen_mask = torch.rand(entries.numel(), generator=gen) < holes
    train, frozen = entries[~frozen_mask].to(torch.int32), entries[frozen_mask].to(torch.int32)
    values = torch.randn(train.numel(), generator=gen).requires_grad_()
    return train, frozen, values, torch.randn(frozen.numel(), generator=gen)


def _reference(x, weight, train, values, frozen, frozen_values, grad_out):
    """Output and gradients of x and the values, by autograd through a dense float64 weight."""
    x = x.detach().double().requires_grad_()
    values = values.detach().double().requires_grad_()
    shape = tuple(weight.shape)
    w = weight.double() + dense_delta(train, values, shape, torch.float64)
    w = w + dense_delta(frozen, frozen_values, shape, torch.float64)
    y = x @ w.T
    y.backward(grad_out.double())
    return y, x.grad, values.grad


def _products(weight):
    """The training (merged) product and the inference one (base output plus the CSR delta product)."""

    def merged(x, values, frozen_values, pattern):
        return merged_delta_linear(x, values, frozen_values, None, pattern, lambda: weight.to(x.dtype, copy=True))

    def sparse(x, values, frozen_values, pattern):
        return x @ weight.to(x.dtype).T + sparse_delta_linear(x, values, frozen_values, pattern)

    return {"merged": merged, "sparse": sparse}


@pytest.mark.parametrize("product", ["merged", "sparse"])
@pytest.mark.parametrize(("shape", "granularity", "block", "units"), CASES, ids=IDS)
def test_structured_supports_take_the_cover_and_match_the_dense_reference(product, shape, granularity, block, units):
    train, frozen, values, frozen_values = _support(shape, granularity, block, units)
    pattern = DeltaPattern(train, frozen, shape)
    assert pattern.cover is not None and pattern.cover.granularity == granularity
    assert pattern.trainable is None  # no CSR structure built
    if shape == (128, 96):
        assert pattern.cover.units.tolist() == units and pattern.cover.block == block
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, shape[1], 5).transpose(1, 2).requires_grad_()  # [3, 5, in], not contiguous
    grad_out = torch.randn(3, 5, shape[0])
    y = _products(weight)[product](x, values, frozen_values, pattern)
    y.backward(grad_out)
    y_ref, x_grad, values_grad = _reference(x, weight, train, values, frozen, frozen_values, grad_out)
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad, x_grad.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(values.grad, values_grad.float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("shape", "granularity", "block", "units"), CASES, ids=IDS)
def test_bfloat16_inputs_keep_fp32_value_gradients_within_bf16_rounding(shape, granularity, block, units):
    train, frozen, values, frozen_values = _support(shape, granularity, block, units)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, shape[1]).bfloat16().requires_grad_()
    grad_out = torch.randn(4, shape[0]).bfloat16()
    y = _products(weight)["merged"](x, values, frozen_values, DeltaPattern(train, frozen, shape))
    assert y.dtype == torch.bfloat16
    y.backward(grad_out)
    assert values.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    _, _, values_grad = _reference(x, weight, train, values, frozen, frozen_values, grad_out.float())
    scale = values_grad.abs().max()
    torch.testing.assert_close(values.grad.double(), values_grad, rtol=0, atol=2e-2 * scale)  # bf16: 8 bits


@pytest.mark.parametrize(("shape", "granularity", "block", "units"), CASES[:4], ids=IDS[:4])
@pytest.mark.parametrize("product", ["merged", "sparse"])
def test_gradcheck_float64(product, shape, granularity, block, units):
    small = {"row": (6, 5), "column": (6, 5), "block": (72, 40) if block == 16 else (72, 70)}[granularity]
    units = {"row": [1, 4], "column": [0, 3], "block": [0, 7] if block == 16 else [0, 8]}[granularity]
    train, frozen, values, frozen_values = _support(small, granularity, block, units)
    pattern = DeltaPattern(train, frozen, small)
    assert pattern.cover is not None and pattern.cover.granularity == granularity
    weight = torch.randn(small, dtype=torch.float64)
    x = torch.randn(3, small[1], dtype=torch.float64, requires_grad=True)
    run = _products(weight)[product]
    frozen_values = frozen_values.double()
    assert torch.autograd.gradcheck(lambda x_, v_: run(x_, v_, frozen_values, pattern), (x, values.double()))


def test_column_and_block_supports_keep_only_the_columns_they_read():
    shape = (128, 96)
    for granularity, block, units, kept in (("column", None, [5, 9], 2), ("block", 16, [0, 13], 32)):
        train, frozen, values, frozen_values = _support(shape, granularity, block, units, holes=0.0)
        pattern = DeltaPattern(train, frozen, shape)
        x = torch.randn(2, 7, shape[1], requires_grad=True)
        y = merged_delta_linear(x, values, frozen_values, None, pattern, lambda: torch.zeros(shape))
        saved = [t for t in y.grad_fn.saved_tensors if t is not None and t.dim() == 2 and t.shape[0] == 14]
        assert [tuple(t.shape) for t in saved] == [(14, kept)]
    rows, _, values, _ = _support(shape, "row", None, [2], holes=0.0)
    x = torch.randn(14, shape[1], requires_grad=True)
    pattern = DeltaPattern(rows, rows[:0], shape)
    y = merged_delta_linear(x, values, torch.zeros(0), None, pattern, lambda: torch.zeros(shape))
    assert any(t is x for t in y.grad_fn.saved_tensors)  # rows read every column: x itself, no copy


def test_an_unstructured_support_keeps_the_sampled_product():
    gen = torch.Generator().manual_seed(0)
    for k in (1 % 1, 123, 614):  # empty, 1% and 5% of a 128 x 96 weight, at random
        train = torch.randperm(128 * 96, generator=gen)[:k].sort().values.to(torch.int32)
        pattern = DeltaPattern(train, train[:0], (128, 96))
        assert pattern.cover is None and pattern.trainable is not None


def test_units_with_every_entry_locked_drop_out_and_full_units_stay():
    """A unit whose entries are all locked (an earlier stage's core) is no longer covered; a full one is."""
    shape = (64, 48)
    entries = unit_entries(torch.tensor([1, 2, 9]), shape, "row")
    locked = entries[(entries // 48 == 2)]  # row 2 entirely
    holes = entries[(entries // 48 == 9) & (entries % 3 == 0)]  # a third of row 9
    frozen = torch.cat([locked, holes]).sort().values.to(torch.int32)
    train = entries[~torch.isin(entries, frozen)].to(torch.int32)
    pattern = DeltaPattern(train, frozen, shape)
    assert pattern.cover.granularity == "row" and pattern.cover.units.tolist() == [1, 9]
    values = torch.randn(train.numel(), requires_grad=True)
    x, grad_out = torch.randn(6, 48), torch.randn(6, 64)
    frozen_values = torch.randn(frozen.numel())
    sparse_delta_linear(x, values, frozen_values, pattern).backward(grad_out)
    _, _, values_grad = _reference(x, torch.zeros(shape), train, values, frozen, frozen_values, grad_out)
    torch.testing.assert_close(values.grad, values_grad.float(), rtol=1e-5, atol=1e-5)
