"""Independent references that more than one test module checks jetfast against,
with the inputs those modules share.

Each reference is written the plain way (float64, loops, searchsorted), never with the
code under test.
"""

from __future__ import annotations

import math

import numpy as np
import torch


# -- the nearest-bin quantizer ---------------------------------------------------------------------
def reference_codes(z: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """np.searchsorted on the exact float64 midpoints; ties (z on a midpoint) go low."""
    z = np.asarray(z, np.float64)
    codes = np.empty(z.shape, np.int64)
    for d in range(centers.shape[0]):
        row = centers[d].astype(np.float64)
        midpoints = (row[1:] + row[:-1]) / 2
        codes[:, d] = np.searchsorted(midpoints, z[:, d], side="left")
    return codes


def random_centers(rng, d, k, duplicates=False):
    centers = np.sort(rng.normal(size=(d, k)).astype(np.float32) * rng.uniform(0.1, 3.0, size=(d, 1)).astype(np.float32), axis=1)
    if duplicates and k >= 4:
        centers[:, 2] = centers[:, 1]  # a repeated center
        centers = np.sort(centers, axis=1)
    return centers


def random_latents(rng, n, centers):
    d = centers.shape[0]
    z = (rng.normal(size=(n, d)) * 2.0).astype(np.float32)
    if n >= 4:
        # Values exactly on a float32-representable midpoint, beyond both ends, and +-inf.
        z[0] = centers[:, 0] - 10
        z[1] = centers[:, -1] + 10
        z[2, 0] = np.inf
        z[3, -1] = -np.inf
    return z


# -- decode attention ------------------------------------------------------------------------------
def attention_reference(q, k_cache, v_cache, length):
    """fp64 attention of q (B, H, Dh) over cached positions [0, length)."""
    q, k, v = (t.double() for t in (q, k_cache[:, :, :length], v_cache[:, :, :length]))
    scores = torch.einsum("bhd,bhsd->bhs", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), v)


def attention_in_precision(q, k_cache, v_cache, length):
    """Plain PyTorch attention in the inputs' own dtype: the error budget for low precision."""
    k, v = k_cache[:, :, :length], v_cache[:, :, :length]
    scores = torch.einsum("bhd,bhsd->bhs", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), v)


def attention_inputs(batch, heads, max_len, head_dim, length, dtype, seed, poison=True):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, head_dim, generator=generator).to(dtype)
    k_cache = torch.randn(batch, heads, max_len, head_dim, generator=generator).to(dtype)
    v_cache = torch.randn(batch, heads, max_len, head_dim, generator=generator).to(dtype)
    if poison and length < max_len:
        # Anything read beyond `length` turns the output into NaN or garbage.
        k_cache[:, :, length:] = float("nan")
        v_cache[:, :, length:] = float("nan")
        k_cache[:, :, length::2] = 3e4 if dtype == torch.float16 else 1e30
    return q, k_cache, v_cache


def position_major(cache: torch.Tensor) -> torch.Tensor:
    """The same values in the model's cache layout: (S, B, H, Dh) storage seen as (B, H, S, Dh)."""
    return cache.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)


def attention_errors(out, q, k_cache, v_cache, length):
    """(max |out - ref|, max |torch-in-dtype - ref|, max |ref|) against the fp64 reference."""
    ref = attention_reference(q, k_cache, v_cache, length)
    own = attention_in_precision(q, k_cache, v_cache, length)
    return (out.double() - ref).abs().max().item(), (own.double() - ref).abs().max().item(), ref.abs().max().item()


def assert_attention_close(kernel_error, torch_error, ref_max, dtype):
    if dtype == torch.float32:
        assert kernel_error <= 2e-6 * max(1.0, ref_max), kernel_error
    else:
        # flash-attention's criterion: no worse than twice PyTorch's own error in that dtype,
        # plus one unit in the last place of the output (its final rounding alone may cost
        # that much on a draw where PyTorch's rounding happened to land closer).
        bound = 2 * torch_error + torch.finfo(dtype).eps * ref_max
        assert kernel_error <= bound, (kernel_error, torch_error, ref_max)
