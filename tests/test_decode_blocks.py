"""The fused CPU decode step (jetfast._C.DecodeBlocks) against the PyTorch blocks it replaces:
fresh random models of odd sizes, every position, batches 1..15 (matrix-vector rows) and from 16
on (MKL's packed GEMMs), and inputs large enough to exercise the layer norms and the GELU's tails;
bad arrays are Python errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jetfast._ext import require_native
from jetfast.kernels.linear import mkl_bf16_gemm, mkl_gemm
from jetfast.models.gpt import MATVEC_MAX_ROWS, GPT, GPTConfig

needs_mkl = pytest.mark.skipif(not mkl_gemm(), reason="packed GEMMs need a PyTorch built with MKL")
needs_mkl_bf16 = pytest.mark.skipif(not mkl_bf16_gemm(), reason="bf16 GEMMs need MKL's and a CPU where PyTorch runs bf16")


def _model(rng, d_model, heads, layers, seq_len=9, scale=1.0):
    torch.manual_seed(int(rng.integers(1 << 31)))
    model = GPT(GPTConfig(vocab_size=11, seq_len=seq_len, d_model=d_model, n_heads=heads, n_layers=layers)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def _blocks_in_pytorch(model, x, pos, dtype=torch.float32):
    weights = model.decode_weights(dtype)
    for block, w in zip(model.blocks, weights):
        x = block.decode_step(x, pos, w)
    return x


def _copy_caches(model):
    return [(b.attn.kv_cache.k_cache.clone(), b.attn.kv_cache.v_cache.clone()) for b in model.blocks]


@pytest.mark.parametrize("d_model, heads, layers, batch", [
    (24, 3, 1, 1), (40, 5, 2, 3), (64, 4, 3, 7), (33, 3, 2, 15),
    pytest.param(33, 3, 2, 16, marks=needs_mkl), pytest.param(40, 5, 2, 37, marks=needs_mkl),
    pytest.param(64, 8, 2, 100, marks=needs_mkl),
])
@torch.inference_mode()
def test_fused_blocks_match_the_pytorch_blocks(d_model, heads, layers, batch, rng):
    model = _model(rng, d_model, heads, layers, scale=3.0)  # large weights: activations far into the GELU's tails
    model.setup_caches(batch)
    fused = model.fused_blocks(torch.zeros(batch, d_model))
    assert fused is not None
    for pos in range(model.config.seq_len):
        x = torch.from_numpy(rng.normal(0, 2, (batch, d_model)).astype(np.float32))
        before = _copy_caches(model)
        want = _blocks_in_pytorch(model, x.clone(), pos)
        after = _copy_caches(model)
        # the same step again through the fused call, from the caches as they were
        for block, (k, v) in zip(model.blocks, before):
            block.attn.kv_cache.k_cache.copy_(k)
            block.attn.kv_cache.v_cache.copy_(v)
        got = x.clone()
        fused.step(got.numpy(), pos, torch.get_num_threads())
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5 * float(want.abs().max()))
        for block, (k, v) in zip(model.blocks, after):  # the same keys and values were cached
            torch.testing.assert_close(block.attn.kv_cache.k_cache[:, :, : pos + 1], k[:, :, : pos + 1], rtol=2e-5, atol=1e-5)
            torch.testing.assert_close(block.attn.kv_cache.v_cache[:, :, : pos + 1], v[:, :, : pos + 1], rtol=2e-5, atol=1e-5)


@pytest.mark.skipif(not require_native().decode_blocks_bf16, reason="bf16 fused blocks need AVX2 + FMA")
@pytest.mark.parametrize("d_model, heads, layers, batch", [
    (24, 3, 1, 1), (64, 4, 3, 7), (48, 2, 2, 15),
    pytest.param(48, 3, 2, 16, marks=needs_mkl_bf16), pytest.param(64, 4, 2, 37, marks=needs_mkl_bf16),
    pytest.param(32, 4, 2, 549, marks=needs_mkl_bf16),  # two tiles of 512 rows, the second partial
])
def test_fused_bf16_blocks_match_fp32_arithmetic_on_bf16_weights(d_model, heads, layers, batch, rng):
    """bf16 caches and weights: the fused step is the fp32 computation on the bf16-rounded weights,
    with each cached key and value rounded to bf16 (to nearest even, as torch rounds), and from
    MATVEC_MAX_ROWS rows on (MKL's bf16 GEMMs) each GEMM's input rounded to bf16 as well. Checked
    against that computation in float64 from the same rounded operands, at every position, and
    against the PyTorch bf16 blocks (which also round the layer inputs) within bf16's precision."""
    model = _model(rng, d_model, heads, layers, scale=2.0)  # made outside inference mode, as a sampler's is
    with torch.inference_mode():
        _fused_bf16_steps(model, d_model, heads, batch, rng)


def _fused_bf16_steps(model, d_model, heads, batch, rng):
    model.setup_caches(batch, dtype=torch.bfloat16)
    fused = model.fused_blocks(torch.zeros(batch, d_model))
    assert fused is not None
    weights = model.decode_weights(torch.bfloat16)
    gemm = batch >= MATVEC_MAX_ROWS

    def low(t):  # a GEMM's input: rounded to bf16 by the GEMM path, fp32 in the matrix-vector rows
        return t.to(torch.bfloat16).double() if gemm else t

    for pos in range(model.config.seq_len):
        x = torch.from_numpy(rng.normal(0, 2, (batch, d_model)).astype(np.float32))
        before = _copy_caches(model)
        pytorch = _blocks_in_pytorch(model, x.clone(), pos, torch.bfloat16)  # writes the caches: restore them
        for block, (k, v) in zip(model.blocks, before):
            block.attn.kv_cache.k_cache.copy_(k)
            block.attn.kv_cache.v_cache.copy_(v)
        got = x.clone()
        fused.step(got.numpy(), pos, torch.get_num_threads())
        # Reference: float64 on the same bf16 weights, fp32 biases and layer norms. Each key and value
        # the step cached must be the reference's own rounded to nearest; one next to a rounding
        # boundary may round either way, so the reference attends over the cached ones, and such a
        # flip is not carried into the layers after it.
        want = x.double()
        for block, w, (k, v) in zip(model.blocks, weights, before):
            qkv_w, _, proj_w, _, fc_w, _, out_w, _ = (t.double() for t in w)
            attn = block.attn
            h = torch.nn.functional.layer_norm(want, (d_model,), block.ln_1.weight.double(), block.ln_1.bias.double(), block.ln_1.eps)
            qkv = (low(h) @ qkv_w.T + attn.qkv.bias.double()).view(batch, 3, heads, d_model // heads)
            caches = (attn.kv_cache.k_cache, attn.kv_cache.v_cache)
            for cache, old, exact in zip(caches, (k, v), (qkv[:, 1], qkv[:, 2])):
                assert torch.equal(cache[:, :, :pos], old[:, :, :pos]), "earlier positions were rewritten"
                cached = cache[:, :, pos].double()
                half_step = torch.ldexp(torch.ones_like(cached), torch.frexp(cached).exponent - 9)
                # fp32 sums (a small key cancels) and, in the GEMM path, bf16 inputs that round either way
                slack = (2 ** -6 if gemm else 1e-5) * float(exact.abs().max())
                excess = (cached - exact).abs() - half_step
                assert float(excess.max()) <= slack, f"a cached entry is {float(excess.max()):.3g} beyond its rounding"
            k, v = (cache[:, :, : pos + 1].double() for cache in caches)
            scores = torch.einsum("bhd,bhsd->bhs", qkv[:, 0], k) / math.sqrt(d_model // heads)
            y = torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), v).reshape(batch, d_model)
            want = want + low(y) @ proj_w.T + attn.proj.bias.double()
            h = torch.nn.functional.layer_norm(want, (d_model,), block.ln_2.weight.double(), block.ln_2.bias.double(), block.ln_2.eps)
            hidden = torch.nn.functional.gelu(low(h) @ fc_w.T + block.mlp.fc.bias.double())
            want = want + low(hidden) @ out_w.T + block.mlp.proj.bias.double()
        scale = float(want.abs().max())
        # (a GEMM input that lands next to a rounding boundary may round either way in the GEMM path)
        tolerance = 1e-3 if gemm else 1e-4
        torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance * scale)
        torch.testing.assert_close(got, pytorch, rtol=0.05, atol=0.05 * scale)  # bf16-rounded layer inputs there


@torch.inference_mode()
def test_decode_step_takes_the_fused_call_where_it_serves(rng):
    model = _model(rng, 32, 4, 2)
    model.setup_caches(MATVEC_MAX_ROWS - 1)
    assert model.fused_blocks(torch.zeros(MATVEC_MAX_ROWS - 1, 32)) is not None
    model.setup_caches(MATVEC_MAX_ROWS)  # packed GEMMs: where PyTorch carries MKL
    assert (model.fused_blocks(torch.zeros(MATVEC_MAX_ROWS, 32)) is not None) == mkl_gemm()
    model.setup_caches(MATVEC_MAX_ROWS, dtype=torch.bfloat16)  # bf16 GEMMs: MKL's where PyTorch runs bf16
    assert (model.fused_blocks(torch.zeros(MATVEC_MAX_ROWS, 32)) is not None) == mkl_bf16_gemm()
    model.setup_caches(3, dtype=torch.bfloat16)  # bf16 weights and caches: where the CPU has AVX2
    assert (model.fused_blocks(torch.zeros(3, 32)) is not None) == require_native().decode_blocks_bf16
    with torch.enable_grad():
        model.setup_caches(3)
        assert model.fused_blocks(torch.zeros(3, 32)) is None
    half = _model(rng, 32, 4, 2).to(torch.bfloat16)
    half.setup_caches(3, dtype=torch.float32)  # bf16 weights, fp32 caches: not the fused call's
    assert half.fused_blocks(torch.zeros(3, 32)) is None
    # Made again for new caches; the same object while nothing is replaced.
    model.setup_caches(2)
    first = model.fused_blocks(torch.zeros(2, 32))
    assert model.fused_blocks(torch.zeros(2, 32)) is first
    model.setup_caches(2, max_len=5)
    assert model.fused_blocks(torch.zeros(2, 32)) is not first


@needs_mkl
def test_packed_blocks_are_made_again_when_a_parameter_changes_in_place(rng):
    """Packed weights are copies: an optimizer step (an in-place change, same storage) must not
    leave a decode computing from the old ones."""
    model = _model(rng, 32, 4, 2)
    batch = MATVEC_MAX_ROWS + 3
    with torch.inference_mode():
        model.setup_caches(batch)
        first = model.fused_blocks(torch.zeros(batch, 32))
        assert first is not None and model.fused_blocks(torch.zeros(batch, 32)) is first
    with torch.no_grad():
        model.blocks[1].mlp.fc.weight.mul_(1.5)
    with torch.inference_mode():
        fused = model.fused_blocks(torch.zeros(batch, 32))
        assert fused is not first
        x = torch.from_numpy(rng.normal(0, 2, (batch, 32)).astype(np.float32))
        before = _copy_caches(model)
        want = _blocks_in_pytorch(model, x.clone(), 0)
        for block, (k, v) in zip(model.blocks, before):
            block.attn.kv_cache.k_cache.copy_(k)
            block.attn.kv_cache.v_cache.copy_(v)
        got = x.clone()
        fused.step(got.numpy(), 0, torch.get_num_threads())
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5 * float(want.abs().max()))


@pytest.mark.parametrize("batch", [2, pytest.param(MATVEC_MAX_ROWS + 5, marks=needs_mkl)])
@torch.inference_mode()
def test_fused_decode_matches_the_full_forward(rng, batch):
    """Codes fed one at a time through the fused step give the logits of one full forward pass."""
    model = _model(rng, 48, 4, 2, seq_len=12)
    codes = torch.from_numpy(rng.integers(0, 11, (batch, 11)))
    idx = torch.cat([model.class_tokens(torch.from_numpy(rng.integers(0, 2, batch)))[:, None], codes], dim=1)
    want = model(idx)
    model.setup_caches(batch)
    got = [model.decode_step(idx[:, 0], 0)] + [model.decode_step(idx[:, t], t) for t in range(1, 12)]
    assert model._sequence_blocks is not None and model.fused_blocks(torch.zeros(batch, 48)) is model._sequence_blocks
    torch.testing.assert_close(torch.stack(got, dim=1), want, rtol=1e-4, atol=1e-4)


def test_bad_arrays_are_python_errors(rng):
    _C = require_native()
    model = _model(rng, 16, 2, 1)
    model.setup_caches(2)
    with torch.inference_mode():
        fused = model.fused_blocks(torch.zeros(2, 16))
        with pytest.raises(ValueError, match="x must be"):
            fused.step(np.zeros((3, 16), np.float32), 0, 1)
        with pytest.raises(TypeError, match="float32"):
            fused.step(np.zeros((2, 16), np.float64), 0, 1)
        with pytest.raises(ValueError, match="outside the cache"):
            fused.step(np.zeros((2, 16), np.float32), 9, 1)
        with pytest.raises(ValueError, match="outside the cache"):
            fused.step(np.zeros((2, 16), np.float32), -1, 1)
        block = model.blocks[0]
        arrays = [t.detach().numpy() for t in (
            block.ln_1.weight, block.ln_1.bias, block.attn.qkv.weight, block.attn.qkv.bias, block.attn.proj.weight,
            block.attn.proj.bias, block.ln_2.weight, block.ln_2.bias, block.mlp.fc.weight, block.mlp.fc.bias,
            block.mlp.proj.weight, block.mlp.proj.bias)]
        caches = [block.attn.kv_cache.k_cache.permute(2, 0, 1, 3).numpy(), block.attn.kv_cache.v_cache.permute(2, 0, 1, 3).numpy()]
        _C.DecodeBlocks([arrays + caches], [(1e-5, 1e-5)], 2)  # as the model makes it
        with pytest.raises(ValueError, match="qkv.weight must be"):
            _C.DecodeBlocks([arrays[:2] + [arrays[2][:-1]] + arrays[3:] + caches], [(1e-5, 1e-5)], 2)
        with pytest.raises(ValueError, match="14 arrays"):
            _C.DecodeBlocks([arrays + caches[:1]], [(1e-5, 1e-5)], 2)
        with pytest.raises(ValueError, match="heads"):
            _C.DecodeBlocks([arrays + caches], [(1e-5, 1e-5)], 4)
        with pytest.raises(ValueError, match="C-contiguous"):
            _C.DecodeBlocks([arrays[:2] + [arrays[2].T.copy().T] + arrays[3:] + caches], [(1e-5, 1e-5)], 2)
        with pytest.raises(ValueError, match="eps"):
            _C.DecodeBlocks([arrays + caches], [], 2)
        if _C.decode_blocks_bf16:  # bf16 wants the bits of the weights and caches, not floats
            with pytest.raises(TypeError, match="qkv.weight must be bfloat16 bits"):
                _C.DecodeBlocks([arrays + caches], [(1e-5, 1e-5)], 2, bf16=True)
