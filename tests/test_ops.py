"""The sparse-delta products against a dense reference: values, gradients, dtypes, layouts, empty supports."""

from __future__ import annotations

import pytest
import torch

from peft_isolate.tuner.ops import DeltaPattern, dense_delta, merged_delta_linear, sparse_delta_linear


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
    y = sparse_delta_linear(x, values, frozen_values, DeltaPattern(train, frozen, shape))
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
        lambda x_, v_: sparse_delta_linear(x_, v_, frozen_values.double(), DeltaPattern(train, frozen, (6, 5))),
        (x, values),
    )


def test_non_contiguous_input():
    x, train, values, frozen, frozen_values = _case(9, 12, 20, 5, torch.float32)
    wide = torch.randn(3, 12, 4).transpose(1, 2)  # [3, 4, 12], not contiguous
    assert not wide.is_contiguous()
    y = sparse_delta_linear(wide, values, frozen_values, DeltaPattern(train, frozen, (9, 12)))
    torch.testing.assert_close(y, _reference(wide, train, values, frozen, frozen_values, (9, 12)).float())


def test_bfloat16_input_gives_bfloat16_output_and_fp32_value_grads():
    x, train, values, frozen, frozen_values = _case(16, 24, 30, 10, torch.bfloat16)
    y = sparse_delta_linear(x, values, frozen_values, DeltaPattern(train, frozen, (16, 24)))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert values.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    ref = _reference(x.detach(), train, values.detach(), frozen, frozen_values, (16, 24))
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)  # bf16 input rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_does_not_change_the_sparse_product(dtype):
    """Under CPU bf16 autocast (Trainer's `bf16=True` evaluation) the product runs as without it, bit for bit:
    autocast would hand torch's CSR kernels bf16 operands, which they do not implement."""
    x, train, values, frozen, frozen_values = _case(16, 24, 30, 10, dtype)
    pattern, grad_out = DeltaPattern(train, frozen, (16, 24)), torch.randn(3, 4, 16).to(dtype)
    results = []
    for autocast in (False, True):
        x.grad = values.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = sparse_delta_linear(x, values, frozen_values, pattern)
            y.backward(grad_out)
        results.append((y.detach(), x.grad, values.grad))
    for plain, autocast in zip(*results, strict=True):
        assert torch.equal(plain, autocast)


def test_empty_support_is_zero_and_keeps_no_graph():
    x = torch.randn(2, 5, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.int32)
    y = sparse_delta_linear(x, torch.zeros(0, requires_grad=True), torch.zeros(0), DeltaPattern(empty, empty, (3, 5)))
    assert torch.equal(y, torch.zeros(2, 3)) and not y.requires_grad


def test_frozen_part_gets_no_gradient_and_x_only_saved_when_needed():
    x, train, values, frozen, frozen_values = _case(8, 8, 5, 5, torch.float32)
    frozen_values.requires_grad_()
    sparse_delta_linear(x, values, frozen_values, DeltaPattern(train, frozen, (8, 8))).sum().backward()
    assert frozen_values.grad is None and values.grad is not None


def _merged(x, values, frozen_values, bias, train, frozen, weight):
    pattern = DeltaPattern(train, frozen, tuple(weight.shape))
    return merged_delta_linear(x, values, frozen_values, bias, pattern, lambda: weight.clone())


@pytest.mark.parametrize("shape", [(7, 5), (64, 33), (17, 128)])
@pytest.mark.parametrize("k", [(0, 4), (6, 0), (10, 9), (1, 1)])
def test_merged_product_matches_dense_reference(shape, k):
    """The training product `x @ (W + Delta)^T + b`: output and the gradients of x, the values and the bias."""
    x, train, values, frozen, frozen_values = _case(*shape, *k, torch.float32)
    weight, bias = torch.randn(shape), torch.randn(shape[0], requires_grad=True)
    grad_out = torch.randn(3, 4, shape[0])
    _merged(x, values, frozen_values, bias, train, frozen, weight).backward(grad_out)
    x_ref, values_ref, bias_ref = (t.detach().double().requires_grad_() for t in (x, values, bias))
    y_ref = x_ref @ weight.double().T + _reference(x_ref, train, values_ref, frozen, frozen_values, shape) + bias_ref
    y_ref.backward(grad_out.double())
    for got, want in ((x.grad, x_ref.grad), (values.grad, values_ref.grad), (bias.grad, bias_ref.grad)):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-4)


def test_merged_product_gradcheck_float64_non_contiguous():
    x, train, values, frozen, frozen_values = _case(6, 5, 7, 3, torch.float64)
    values = values.detach().double().requires_grad_()
    wide = torch.randn(3, 5, 4, dtype=torch.float64).transpose(1, 2).requires_grad_()  # [3, 4, 5], not contiguous
    weight = torch.randn(6, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x_, v_: _merged(x_, v_, frozen_values.double(), None, train, frozen, weight), (wide, values)
    )


def test_merged_product_in_bfloat16_keeps_fp32_value_grads():
    x, train, values, frozen, frozen_values = _case(16, 24, 30, 10, torch.bfloat16)
    weight = torch.randn(16, 24, generator=torch.Generator().manual_seed(1))
    y = _merged(x, values, frozen_values, None, train, frozen, weight.bfloat16())
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert values.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    merged = weight.double() + dense_delta(train, values.detach(), (16, 24), torch.float64)
    merged += dense_delta(frozen, frozen_values, (16, 24), torch.float64)
    ref = x.detach().double() @ merged.T
    # x is exact in bf16; W, the values and W + Delta are rounded to bf16 (unit roundoff u = 2^-8 each, three in
    # a row at most), y once more: |y - ref| <= 3u sum_i |x_i| |w_i| + u |ref|, the bound of a rounded dot product
    u = 2.0**-8
    bound = 3 * u * (x.detach().double().abs() @ merged.abs().T) + u * ref.abs()
    assert ((y.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("k", [0, 1, 700])
def test_value_gradient_is_the_sampled_weight_gradient(k):
    """The value gradient on this machine's path (torch's SDDMM on CPU) equals the dense weight gradient at the
    support, with an empty support included."""
    gen = torch.Generator().manual_seed(k)
    g, x = torch.randn(50, 40, generator=gen), torch.randn(50, 30, generator=gen)
    train, empty = _support(40 * 30, k, gen), torch.zeros(0, dtype=torch.int32)
    got = DeltaPattern(train, empty, (40, 30)).value_gradient(g, x, torch.float32)
    torch.testing.assert_close(got, (g.double().T @ x.double()).flatten()[train.long()].float())


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,k", [((64, 33), (0, 4)), ((64, 33), (1, 1)), ((300, 1000), (3000, 500))])
def test_cuda_merged_product_matches_dense_reference(dtype, shape, k):
    """On CUDA (cuBLAS products, the value gradient gathered from the dense one): output and gradients against a
    float64 reference, on a non-contiguous input, in fp32 and bf16."""
    _, train, values, frozen, frozen_values = _case(*shape, *k, torch.float32)
    cuda = torch.device("cuda")
    weight = torch.randn(shape)
    x = torch.randn(3, shape[1], 4).transpose(1, 2).to(cuda, dtype).requires_grad_()  # [3, 4, in], not contiguous
    values = values.detach().to(cuda).requires_grad_()
    grad_out = torch.randn(3, 4, shape[0])
    y = _merged(x, values, frozen_values.to(cuda), None, train.to(cuda), frozen.to(cuda), weight.to(cuda, dtype))
    y.backward(grad_out.to(cuda, dtype))
    assert y.dtype == dtype and values.grad.dtype == torch.float32
    x_ref, values_ref = x.detach().double().cpu().requires_grad_(), values.detach().double().cpu().requires_grad_()
    y_ref = x_ref @ weight.to(dtype).double().T + _reference(x_ref, train, values_ref, frozen, frozen_values, shape)
    y_ref.backward(grad_out.to(dtype).double())
    tol = 1e-4 if dtype == torch.float32 else 5e-2  # bf16 rounding of x, W + Delta, y and the output gradient
    for got, want in ((y, y_ref), (x.grad, x_ref.grad), (values.grad, values_ref.grad)):
        torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=tol, atol=tol)
