"""jetfast.kernels.linear: oneDNN with a fused GELU where autograd is off, F.linear elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jetfast.kernels.linear import linear, pack


def reference(x, weight, bias, activation):
    y = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    return F.gelu(y) if activation == "gelu" else y


@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(513, 1, 256), (3, 7, 33), (1, 5), (0, 17)])
def test_matches_fp64_reference_without_autograd(shape, with_bias, activation, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator)
    weight = torch.randn(29, shape[-1], generator=generator) / shape[-1] ** 0.5
    bias = torch.randn(29, generator=generator) if with_bias else None
    with torch.inference_mode():
        out = linear(x, weight, bias, activation)
    assert out.shape == (*shape[:-1], 29) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(x, weight, bias, activation), rtol=0, atol=2e-5)


def test_bfloat16_stays_within_bfloat16_rounding():
    x, weight, bias = torch.randn(64, 128), torch.randn(96, 128) / 128**0.5, torch.randn(96)
    with torch.no_grad():
        out = linear(x.bfloat16(), weight.bfloat16(), bias.bfloat16(), "gelu")
    assert out.dtype == torch.bfloat16
    expected = reference(x.bfloat16(), weight.bfloat16(), bias.bfloat16(), "gelu")
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


def test_gradients_flow_when_autograd_is_on():
    x = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(5, 8, requires_grad=True)
    linear(x, weight, None, "gelu").sum().backward()
    expected = torch.autograd.grad(F.gelu(F.linear(x, weight)).sum(), (x, weight))
    torch.testing.assert_close(x.grad, expected[0])
    torch.testing.assert_close(weight.grad, expected[1])


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="activation must be one of"):
        linear(torch.randn(2, 3), torch.randn(4, 3), activation="relu")


@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("rows, packed_for", [(100, 100), (17, 17), (1, 1), (37, 100)])
def test_packed_weights_give_the_same_products(rows, packed_for, with_bias, activation, seed):
    """A weight packed for some row count gives F.linear's result for that count, and for any
    other (computed from the weight itself)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 259, generator=generator)
    weight = torch.randn(97, 259, generator=generator) / 259**0.5
    bias = torch.randn(97, generator=generator) if with_bias else None
    with torch.inference_mode():
        packed = pack(weight, packed_for)
        if packed is None:
            pytest.skip("this torch has no MKL weight packing")
        out = linear(x, weight, bias, activation, packed=packed)
    assert packed.rows == packed_for and out.shape == (rows, 97) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(x, weight, bias, activation), rtol=0, atol=2e-5)


def test_weights_are_packed_only_where_the_packed_product_serves():
    weight = torch.randn(8, 16)
    with torch.no_grad():
        assert pack(weight.bfloat16(), 4) is None
        assert pack(weight.double(), 4) is None
        assert pack(weight, 0) is None
    assert pack(weight, 4) is None  # autograd on
    with torch.no_grad():
        packed = pack(weight, 4)
    if packed is None:
        pytest.skip("this torch has no MKL weight packing")
    x = torch.randn(4, 16, requires_grad=True)
    out = linear(x, weight, None, "gelu", packed=packed)  # autograd on: the packing is ignored
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.autograd.grad(F.gelu(F.linear(x, weight)).sum(), x)[0])
