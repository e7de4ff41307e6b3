"""decode_attention's compiled Triton kernel on a GPU, against an fp64 reference.

Skipped (visibly) on machines without CUDA; the same kernel is checked everywhere
in Triton's interpreter by test_decode_attention.py.
"""

from __future__ import annotations

import pytest
import torch

from jetfast.kernels.decode_attention import _decode_attention_triton, decode_attention
from tests.references import assert_attention_close, attention_errors, attention_inputs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the kernel is run in Triton's "
                       "interpreter by test_decode_attention.py)"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("batch, heads, max_len, length", [(4, 8, 128, 1), (3, 5, 131, 7), (2, 8, 128, 128),
                                                           (1, 2, 4099, 4000)])
def test_cuda_kernel_matches_fp64_reference(dtype, head_dim, batch, heads, max_len, length, seed):
    q, k_cache, v_cache = (t.cuda() for t in attention_inputs(batch, heads, max_len, head_dim, length, dtype, seed))
    out = decode_attention(q, k_cache, v_cache, length)
    torch.cuda.synchronize()
    assert out.is_cuda and out.dtype == dtype and out.shape == (batch, heads, head_dim)
    assert torch.isfinite(out).all(), f"seed {seed}: the poisoned cache tail was read"
    assert_attention_close(*attention_errors(out.cpu(), q.cpu(), k_cache.cpu(), v_cache.cpu(), length), dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 7])
def test_cuda_split_k_agrees_with_one_split(num_splits):
    q, k_cache, v_cache = (t.cuda() for t in attention_inputs(2, 4, 1000, 64, 999, torch.float32, seed=num_splits))
    out = _decode_attention_triton(q, k_cache, v_cache, 999, num_splits=num_splits)
    torch.testing.assert_close(out, _decode_attention_triton(q, k_cache, v_cache, 999, num_splits=1),
                               rtol=1e-5, atol=1e-6)


def test_cuda_op_under_torch_compile():
    q, k_cache, v_cache = (t.cuda() for t in attention_inputs(2, 4, 64, 32, 40, torch.float16, seed=0, poison=False))
    compiled = torch.compile(lambda q, k, v: decode_attention(q, k, v, 40), fullgraph=True)
    torch.testing.assert_close(compiled(q, k_cache, v_cache), decode_attention(q, k_cache, v_cache, 40))


def test_cuda_opcheck():
    q, k_cache, v_cache = (t.cuda() for t in attention_inputs(2, 3, 50, 64, 33, torch.float32, seed=1, poison=False))
    torch.library.opcheck(torch.ops.jetfast.decode_attention.default, (q, k_cache, v_cache, 33))
