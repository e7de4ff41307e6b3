"""Decode attention: one new query per sequence against a KV cache.

During sampling every step adds one token per sequence, so attention is a
matrix-vector product per head over the cached prefix ``[0, length)``:

    out[b, h] = softmax(q[b, h] . k_cache[b, h, :length]^T / sqrt(Dh)) . v_cache[b, h, :length]

One torch op, ``torch.ops.jetfast.decode_attention``, serves every device so the
model never branches on it:

* CUDA: a Triton kernel fusing QK^T, an online softmax (running max and sum in
  fp32) and the product with V, streaming the prefix in blocks of positions. Long
  caches are split over several programs per head (split-K, "flash-decoding") and
  the partial results are merged by a second small kernel.
* CPU, float32: the compiled kernel (csrc/attention), which streams each row's
  cached prefix once for the scores and once for the values, with an exact
  softmax in between, over blocks of rows on all threads. This is the hot loop of
  CPU sampling and runs at memory bandwidth.
* CPU, float16/bfloat16 or without the compiled module: two batched matrix
  products over views of the cache with an fp32 softmax.

The CPU path does not depend on the environment. On machines without a GPU the
Triton kernel is tested by calling :func:`_decode_attention_triton` on CPU tensors
in a process started with ``TRITON_INTERPRET=1`` (Triton's interpreter).

The op is a ``torch.library.custom_op`` with one kernel per device and a fake
implementation that checks shapes, so ``torch.compile`` traces models through it.
(Not a ``triton_op``: registering one imports triton, and ``import jetfast`` must
not, so that the interpreter can still be switched on afterwards.)
"""

from __future__ import annotations

import functools
import math

import torch

from jetfast._ext import HAS_NATIVE, _C

__all__ = ["decode_attention", "decode_attention_cpu"]

_HEAD_SIZES = (16, 32, 64, 128, 256)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Positions per program in one split; a cache longer than this on few heads is split.
_SPLIT_POSITIONS = 256
# The grid is sized for a large GPU (~100-130 SMs) holding a few programs per SM at once,
# and a memory-bound kernel needs many warps in flight to hide the latency of its loads:
# the launch parameters below keep registers and shared memory low enough for at least
# _PROGRAMS_PER_SM programs and _MIN_WARPS_PER_SM warps (half of sm_80/sm_90's 64) per
# SM, which tests/test_triton_aot.py checks on the kernels compiled for sm_80 and sm_90.
_PROGRAMS_PER_SM = 4
_MIN_WARPS_PER_SM = 32
_TARGET_PROGRAMS = 128 * _PROGRAMS_PER_SM
# Elements of a (BLOCK, Dh) tile per thread: above this the tile's registers limit occupancy.
_TILE_ELEMENTS_PER_THREAD = 16
# The merge kernel reads the partial outputs in (splits, Dh) tiles of at most this many
# elements, looping when there are more splits (a whole tile of 256+ splits spills).
_MERGE_TILE_ELEMENTS = 4096


# --------------------------------------------------------------------------------------
# Triton kernels (built on first use: importing triton costs time and reads
# TRITON_INTERPRET at decoration)
# --------------------------------------------------------------------------------------
@functools.cache
def _triton_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def decode_attention_split_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, m_ptr, l_ptr,
        stride_qb, stride_qh,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        num_heads, length, positions_per_split, sm_scale_log2,
        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # One program = one (batch, head) and one slice of the cached positions.
        # Grid: (batch * heads, splits). Partial outputs are left unnormalised, with
        # their running max m (log2 units) and sum l, for the merge kernel.
        bh = tl.program_id(0)
        split = tl.program_id(1)
        num_splits = tl.num_programs(1)
        b = bh // num_heads
        h = bh % num_heads
        start = split * positions_per_split
        stop = tl.minimum(start + positions_per_split, length)

        dims = tl.arange(0, HEAD_DIM)
        # The query is read once and pre-scaled so the scores come out in log2 units.
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + dims).to(tl.float32) * sm_scale_log2
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_vb + h * stride_vh

        m_i = tl.full((), float("-inf"), tl.float32)
        l_i = tl.zeros((), tl.float32)
        acc = tl.zeros((HEAD_DIM,), tl.float32)
        for block_start in range(start, stop, BLOCK_N):
            positions = block_start + tl.arange(0, BLOCK_N)
            valid = positions < stop
            # Masked loads: nothing at or beyond `length` is ever read.
            keys = tl.load(k_base + positions[:, None] * stride_ks + dims[None, :], mask=valid[:, None], other=0.0)
            # A single query row is a matrix-vector product: multiply and reduce in
            # fp32 (tl.dot needs >= 16 rows, and low-precision operands are upcast).
            scores = tl.sum(keys.to(tl.float32) * q[None, :], axis=1)  # (BLOCK_N,)
            scores = tl.where(valid, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new)  # (BLOCK_N,), 0 where masked
            values = tl.load(v_base + positions[:, None] * stride_vs + dims[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha + tl.sum(p[:, None] * values.to(tl.float32), axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new

        if num_splits == 1:
            tl.store(out_ptr + bh * HEAD_DIM + dims, (acc / l_i).to(out_ptr.dtype.element_ty))
        else:
            part = bh * num_splits + split
            tl.store(out_ptr + part * HEAD_DIM + dims, acc)
            tl.store(m_ptr + part, m_i)
            tl.store(l_ptr + part, l_i)

    @triton.jit
    def decode_attention_merge_kernel(
        part_ptr, m_ptr, l_ptr, out_ptr, num_splits,
        HEAD_DIM: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
    ):
        # One program per (batch, head): rescale the splits to a common max and sum,
        # BLOCK_SPLITS splits at a time (one pass over the maxima, one over the parts).
        bh = tl.program_id(0)
        first = bh * num_splits
        m_max = tl.full((), float("-inf"), tl.float32)
        for block_start in range(0, num_splits, BLOCK_SPLITS):
            splits = block_start + tl.arange(0, BLOCK_SPLITS)
            m = tl.load(m_ptr + first + splits, mask=splits < num_splits, other=float("-inf"))
            m_max = tl.maximum(m_max, tl.max(m, axis=0))
        dims = tl.arange(0, HEAD_DIM)
        acc = tl.zeros((HEAD_DIM,), tl.float32)
        total = tl.zeros((), tl.float32)
        for block_start in range(0, num_splits, BLOCK_SPLITS):
            splits = block_start + tl.arange(0, BLOCK_SPLITS)
            valid = splits < num_splits
            m = tl.load(m_ptr + first + splits, mask=valid, other=float("-inf"))
            l = tl.load(l_ptr + first + splits, mask=valid, other=0.0)
            weight = tl.exp2(m - m_max)  # (BLOCK_SPLITS,), 0 for padding
            parts = tl.load(
                part_ptr + (first + splits)[:, None] * HEAD_DIM + dims[None, :], mask=valid[:, None], other=0.0
            )
            acc += tl.sum(parts * weight[:, None], axis=0)
            total += tl.sum(l * weight, axis=0)
        tl.store(out_ptr + bh * HEAD_DIM + dims, (acc / total).to(out_ptr.dtype.element_ty))

    return decode_attention_split_kernel, decode_attention_merge_kernel


def _split_launch(head_dim: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the split kernel for a head size.

    BLOCK_N positions per step keep a (BLOCK_N, Dh) tile of keys, then of values, in
    registers; the warps are as many as keep each thread's share of it at
    _TILE_ELEMENTS_PER_THREAD (4 warps up to a 64 x 32 tile, 8 above). With four warps
    the split kernel needed up to 80 registers per thread at Dh = 64 and 96 at Dh = 256 on
    sm_80, which leave 24 and 20 warps per SM, short of _MIN_WARPS_PER_SM.
    """
    block_n = 64 if head_dim <= 64 else 32
    num_warps = min(8, max(4, block_n * head_dim // (_TILE_ELEMENTS_PER_THREAD * 32)))
    return block_n, num_warps


def _merge_launch(head_dim: int, num_splits: int) -> tuple[int, int]:
    """(BLOCK_SPLITS, num_warps) of the merge kernel: splits per step and warps."""
    block_splits = max(2, min(1 << (num_splits - 1).bit_length(), _MERGE_TILE_ELEMENTS // head_dim))
    return block_splits, 4


def _choose_splits(batch_heads: int, length: int) -> int:
    """Split the prefix only when there are too few (batch, head) programs."""
    if batch_heads >= _TARGET_PROGRAMS:
        return 1
    return max(1, min(-(-length // _SPLIT_POSITIONS), -(-_TARGET_PROGRAMS // batch_heads)))


def _decode_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: int, num_splits: int | None = None
) -> torch.Tensor:
    """Launch the Triton kernel(s). q (B, H, Dh) with unit stride along Dh."""
    split_kernel, merge_kernel = _triton_kernels()
    batch, heads, _, head_dim = k_cache.shape
    out = torch.empty((batch, heads, head_dim), dtype=q.dtype, device=q.device)
    block_n, num_warps = _split_launch(head_dim)
    splits = _choose_splits(batch * heads, length) if num_splits is None else max(1, min(num_splits, length))
    # Whole blocks per split, and no empty split (its running max would stay -inf).
    per_split = -(-length // splits)
    per_split = -(-per_split // block_n) * block_n
    splits = -(-length // per_split)
    sm_scale_log2 = (1.0 / math.sqrt(head_dim)) * math.log2(math.e)
    if splits == 1:
        partial, m_part, l_part = out, out, out  # unused by the single-split branch
    else:
        partial = torch.empty((batch * heads * splits, head_dim), dtype=torch.float32, device=q.device)
        m_part = torch.empty((batch * heads * splits,), dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
    split_kernel[(batch * heads, splits)](
        q, k_cache, v_cache, partial, m_part, l_part,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        heads, length, per_split, sm_scale_log2,
        HEAD_DIM=head_dim, BLOCK_N=block_n, num_warps=num_warps,
    )
    if splits > 1:
        block_splits, merge_warps = _merge_launch(head_dim, splits)
        merge_kernel[(batch * heads,)](
            partial, m_part, l_part, out, splits, HEAD_DIM=head_dim, BLOCK_SPLITS=block_splits, num_warps=merge_warps
        )
    return out


# --------------------------------------------------------------------------------------
# CPU path
# --------------------------------------------------------------------------------------
def _decode_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: int,
                          k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None) -> torch.Tensor:
    # The compiled kernel reads fp32 caches, and bf16 ones widened as it reads them: the fallback
    # below would copy a bf16 cache whole to fp32 at every step (5.8x the fp32 step at batch 512).
    bf16 = q.dtype == k_cache.dtype == v_cache.dtype == torch.bfloat16
    fp32 = q.dtype == k_cache.dtype == v_cache.dtype == torch.float32
    native = HAS_NATIVE and q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and (
        fp32 or (bf16 and _C.decode_attention_bf16 and k_cache.shape[-1] in _C.decode_attention_bf16_head_dims))
    appends = k_new is not None
    if appends and not (native and fp32 and k_new.dtype == v_new.dtype == torch.float32
                        and k_new.stride(2) == v_new.stride(2) == 1 and k_new.stride()[:2] == v_new.stride()[:2]):
        k_cache[:, :, length - 1] = k_new
        v_cache[:, :, length - 1] = v_new
        appends = False
    if native:
        out = torch.empty(q.shape, dtype=torch.float32)
        caches = ((t.detach().view(torch.int16) if bf16 else t.detach()).numpy() for t in (k_cache, v_cache))
        new = (k_new.detach().numpy(), v_new.detach().numpy()) if appends else (None, None)
        _C.decode_attention_cpu(q.detach().float().numpy(), *caches, length, out.numpy(), torch.get_num_threads(), *new)
        return out.to(q.dtype)
    batch, heads, max_len, head_dim = k_cache.shape
    queries = q.reshape(batch * heads, 1, head_dim)  # (B*H, 1, Dh)
    # Once the prefix is a quarter of the cache, read the whole cache: a batched matmul
    # streams a dense cache several times faster per byte than a prefix slice, whose
    # gaps defeat the hardware prefetchers (measured on AVX-512 EPYC, B*H = 4096).
    span = length if 4 * length <= max_len else max_len
    out = _attend(queries, k_cache, v_cache, length, span)
    if span > length and not torch.isfinite(out).all():
        # Positions past `length` enter only as exact zeros (probability 0 times the
        # value), which is harmless unless a value there is inf or NaN: recompute on
        # the prefix alone, so nothing past `length` can reach the result.
        out = _attend(queries, k_cache, v_cache, length, length)
    return out.view(batch, heads, head_dim).to(q.dtype)


def decode_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: int,
                         k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None) -> torch.Tensor:
    """The CPU kernel of :func:`decode_attention`, called directly: no argument checks, no op dispatch.

    For a caller that made the cache itself and calls this once per layer and token (the model's
    cached decode step): at small batches the op's checks and dispatch cost more than the
    attention. Takes q (B, H, Dh) and caches as :func:`decode_attention` documents, on the CPU.
    ``k_new`` and ``v_new`` (B, H, Dh), when given, are first written into the caches at position
    ``length - 1``: in the kernel for fp32 caches, by the threads that attend those rows.
    """
    return _decode_attention_cpu(q, k_cache, v_cache, length, k_new, v_new)


def _attend(queries, k_cache, v_cache, length: int, span: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v over cache positions [0, span), scores >= length masked."""
    head_dim = k_cache.shape[-1]
    keys = k_cache[:, :, :span].flatten(0, 1)  # (B*H, span, Dh), a view when the cache is contiguous
    values = v_cache[:, :, :span].flatten(0, 1)  # (B*H, span, Dh)
    if queries.dtype != torch.float32:
        # Low precision on CPU: accumulate in fp32 like the kernel does.
        keys, values, queries = keys.float(), values.float(), queries.float()
    # Scaling the query (B*H*Dh numbers) is cheaper than scaling the scores.
    scores = torch.bmm(queries * (1.0 / math.sqrt(head_dim)), keys.transpose(1, 2))  # (B*H, 1, span)
    if span > length:
        scores[:, :, length:] = float("-inf")  # a select: NaN or inf keys there cannot leak
    probs = torch.softmax(scores, dim=-1)
    return torch.bmm(probs, values)  # (B*H, 1, Dh)


# --------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------
@torch.library.custom_op("jetfast::decode_attention", mutates_args=(), device_types="cuda")
def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: int) -> torch.Tensor:
    with torch.cuda.device(q.device):
        return _decode_attention_triton(q, k_cache, v_cache, length)


@_decode_attention_op.register_kernel("cpu")
def _(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: int) -> torch.Tensor:
    return _decode_attention_cpu(q, k_cache, v_cache, length)


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, length):
    torch._check(q.dim() == 3 and k_cache.dim() == 4, lambda: "decode_attention: q (B, H, Dh), caches (B, H, S, Dh)")
    torch._check(q.shape[0] == k_cache.shape[0] and q.shape[1] == k_cache.shape[1], lambda: "decode_attention: B, H")
    torch._check(q.shape[2] == k_cache.shape[3], lambda: "decode_attention: head size of q and cache differ")
    torch._check(v_cache.shape == k_cache.shape, lambda: "decode_attention: k_cache and v_cache shapes differ")
    torch._check(1 <= length <= k_cache.shape[2], lambda: "decode_attention: need 1 <= length <= S_max")
    return q.new_empty(q.shape)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: int) -> torch.Tensor:
    """Attention of one query per (sequence, head) over cached positions ``[0, length)``.

    Args:
        q: (B, H, 1, Dh) or (B, H, Dh) query of the newest token.
        k_cache, v_cache: (B, H, S_max, Dh) keys and values; positions ``>= length``
            never affect the result (they may hold anything, NaN included).
        length: number of valid cached positions, ``1 <= length <= S_max``, the new
            token's own key and value included.

    Returns:
        (B, H, Dh) in q's dtype; scores are scaled by ``1/sqrt(Dh)``, the softmax and
        accumulation run in fp32. fp32, fp16 and bf16 inputs; Dh in {16, ..., 256}
        (powers of two) on CUDA, any Dh >= 1 on CPU. Inference only: inputs that require
        grad (with grad mode on) are refused, as the op has no backward.
    """
    if not all(isinstance(t, torch.Tensor) for t in (q, k_cache, v_cache)):
        raise TypeError("decode_attention: q, k_cache and v_cache must be torch tensors")
    if q.dim() == 4:
        if q.shape[2] != 1:
            raise ValueError(f"decode_attention: q must hold one query per head, (B, H, 1, Dh); got {tuple(q.shape)}")
        q = q.squeeze(2)
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(
            "decode_attention: expected q (B, H, Dh) or (B, H, 1, Dh) and caches (B, H, S_max, Dh); "
            f"got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}"
        )
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"decode_attention: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have one shape"
        )
    batch, heads, max_len, head_dim = k_cache.shape
    if tuple(q.shape) != (batch, heads, head_dim):
        raise ValueError(
            f"decode_attention: q {tuple(q.shape)} does not match the cache (B={batch}, H={heads}, Dh={head_dim})"
        )
    if head_dim < 1:
        raise ValueError(f"decode_attention: the head size Dh must be >= 1; got q {tuple(q.shape)}, "
                         f"caches {tuple(k_cache.shape)}")
    if isinstance(length, torch.Tensor) or not isinstance(length, int) or isinstance(length, bool):
        raise TypeError(f"decode_attention: length must be a Python int; got {type(length).__name__}")
    if not 1 <= length <= max_len:
        raise ValueError(f"decode_attention: need 1 <= length <= S_max={max_len}; got length={length}")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(
            "decode_attention: q, k_cache and v_cache must share one dtype among float32, float16, bfloat16; "
            f"got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if not (q.device == k_cache.device == v_cache.device):
        raise ValueError(
            f"decode_attention: tensors on different devices: q {q.device}, k_cache {k_cache.device}, "
            f"v_cache {v_cache.device}"
        )
    if torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad):
        # Sampling needs no gradient, so the op has no backward: refuse here rather than fail in backward().
        raise RuntimeError(
            "decode_attention: inference only, it has no backward; call it under torch.no_grad() or "
            "torch.inference_mode(), or detach the inputs (train with full attention instead)"
        )
    if q.device.type != "cpu":
        if head_dim not in _HEAD_SIZES:
            raise ValueError(f"decode_attention: the Triton kernel supports head sizes {_HEAD_SIZES}; got {head_dim}")
        # The kernel walks Dh with unit stride; other strides are passed through.
        if q.stride(2) != 1:
            q = q.contiguous()
        if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
            raise ValueError("decode_attention: the caches must be contiguous along the head dimension")
    if batch == 0 or heads == 0:
        return q.new_empty((batch, heads, head_dim))
    return _decode_attention_op(q, k_cache, v_cache, length)
