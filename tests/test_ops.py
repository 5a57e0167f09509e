"""The sparse-delta product against a dense reference: values, gradients, dtypes, layouts, empty supports."""

from __future__ import annotations

import pytest
import torch

from peft_isolate.tuner._ops import delta_pattern, dense_delta, sparse_delta_linear


def _support(numel: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(numel, generator=gen)[:k].sort().values.to(torch.int32)


def _case(out_f, in_f, k_train, k_frozen, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    both = _support(out_f * in_f, k_train + k_frozen, gen)
    pick = torch.randperm(both.numel(), generator=gen)
    train = both[pick[:k_train]].sort().values
    frozen = both[pick[k_train:]].sort().values
    values = torch.randn(k_train, generator=gen, dtype=torch.float32).requires_grad_()
    frozen_values = torch.randn(k_frozen, generator=gen, dtype=torch.float32)
    x = torch.randn(3, 4, in_f, generator=gen).to(dtype).requires_grad_()
    return x, train, values, frozen, frozen_values


def _reference(x, train, values, frozen, frozen_values, shape):
    delta = dense_delta(train, values, shape, torch.float64) + dense_delta(frozen, frozen_values, shape, torch.float64)
    return x.double() @ delta.T


@pytest.mark.parametrize("shape", [(7, 5), (64, 33), (17, 128)])
@pytest.mark.parametrize("k", [(0, 4), (6, 0), (10, 9), (1, 1)])
def test_forward_and_gradients_match_dense_reference(shape, k):
    x, train, values, frozen, frozen_values = _case(*shape, *k, torch.float32)
    grad_out = torch.randn(3, 4, shape[0])
    y = sparse_delta_linear(x, values, frozen_values, delta_pattern(train, frozen, shape))
    y.backward(grad_out)
    x_ref = x.detach().double().requires_grad_()
    values_ref = values.detach().double().requires_grad_()
    y_ref = _reference(x_ref, train, values_ref, frozen, frozen_values, shape)
    y_ref.backward(grad_out.double())
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values.grad, values_ref.grad.float(), rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    x, train, values, frozen, frozen_values = _case(6, 5, 7, 3, torch.float64)
    values = values.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x_, v_: sparse_delta_linear(x_, v_, frozen_values.double(), delta_pattern(train, frozen, (6, 5))),
        (x, values),
    )


def test_non_contiguous_input():
    x, train, values, frozen, frozen_values = _case(9, 12, 20, 5, torch.float32)
    wide = torch.randn(3, 12, 4).transpose(1, 2)  # [3, 4, 12], not contiguous
    assert not wide.is_contiguous()
    y = sparse_delta_linear(wide, values, frozen_values, delta_pattern(train, frozen, (9, 12)))
    torch.testing.assert_close(y, _reference(wide, train, values, frozen, frozen_values, (9, 12)).float())


def test_bfloat16_input_gives_bfloat16_output_and_fp32_value_grads():
    x, train, values, frozen, frozen_values = _case(16, 24, 30, 10, torch.bfloat16)
    y = sparse_delta_linear(x, values, frozen_values, delta_pattern(train, frozen, (16, 24)))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert values.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    ref = _reference(x.detach(), train, values.detach(), frozen, frozen_values, (16, 24))
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)  # bf16 input rounding


def test_empty_support_is_zero_and_keeps_no_graph():
    x = torch.randn(2, 5, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.int32)
    y = sparse_delta_linear(x, torch.zeros(0, requires_grad=True), torch.zeros(0), delta_pattern(empty, empty, (3, 5)))
    assert torch.equal(y, torch.zeros(2, 3)) and not y.requires_grad


def test_frozen_part_gets_no_gradient_and_x_only_saved_when_needed():
    x, train, values, frozen, frozen_values = _case(8, 8, 5, 5, torch.float32)
    frozen_values.requires_grad_()
    sparse_delta_linear(x, values, frozen_values, delta_pattern(train, frozen, (8, 8))).sum().backward()
    assert frozen_values.grad is None and values.grad is not None
