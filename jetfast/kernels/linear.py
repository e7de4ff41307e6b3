"""Linear layers for inference: oneDNN on the CPU, with the activation fused.

In CPU sampling the Transformer's GEMMs are (batch x d_model) by (d_model x 4 d_model)
and smaller, where PyTorch's default CPU GEMM plus a separate GELU pass over the
(batch x 4 d_model) activations leaves about 10-25% on the table: oneDNN's linear
with a fused GELU is what ``torch.compile``'s CPU backend emits for the same
pattern. It has no backward, so it is used only where autograd is off; everything
else (training, CUDA, other dtypes) takes ``F.linear``.

Below a few rows the GEMM is a matrix-vector product bound by reading the weights, and
oneDNN's per-call set-up dominates it: measured on 2 cores at one row, (1 x 256) by
(256 x 768) takes ~35 us through MKL's GEMV (``F.linear``) and ~210-280 us through
``_linear_pointwise``, whose cost stays about flat up to ~16 rows while MKL's grows with
them. So fewer than ``_ONEDNN_MIN_ROWS`` rows take ``F.linear``.

That set-up is mostly oneDNN reordering the weight on every call, a fixed ~50-80 us that a
batch of a hundred sequences pays ~17 times per decode step. Where the same fp32 weight
meets the same number of rows over and over (every step of a cached decode), :func:`pack`
has MKL reorder it once into its GEMM's own layout (``cblas_sgemm_pack``) and ``linear(...,
packed=)`` computes from that; measured on 2 cores at 100 rows, (100 x 256) by (256 x 768)
takes ~150 us against ~180 through oneDNN, (100 x 1024) by (1024 x 256) ~170 against ~230.
The GELU is then a separate pass.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from jetfast._ext import HAS_NATIVE, _C

__all__ = ["Packed", "linear", "mkl_bf16_gemm", "mkl_gemm", "pack"]

_ACTIVATIONS = (None, "gelu")
_ONEDNN_MIN_ROWS = 16


@functools.cache
def _onednn_built() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def _onednn_bf16() -> bool:
    # oneDNN runs bf16 only on CPUs with AVX-512 (BF16) or AMX; elsewhere its primitive cannot be made.
    return _onednn_built() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class Packed(NamedTuple):
    """A weight in MKL's GEMM layout (:func:`pack`) and the row count it was packed for."""

    weight: torch.Tensor
    rows: int


@functools.cache
def _mkl_packing() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")


@functools.cache
def mkl_gemm() -> bool:
    """Whether jetfast's compiled code can call MKL's packed SGEMM, which it borrows from PyTorch's CPU
    library (``jetfast._C.load_mkl_gemm``; jetfast links no MKL of its own): the compiled decode step
    of large fp32 batches needs it."""
    if not (HAS_NATIVE and _mkl_packing()):
        return False
    library = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    return os.path.exists(library) and _C.load_mkl_gemm(library)


def mkl_bf16_gemm() -> bool:
    """Whether the compiled decode step of large bf16 batches can use MKL's bf16 GEMM: MKL has it, and
    the CPU is one where PyTorch's own bf16 GEMMs run (oneDNN's), not PyTorch's slow fallback."""
    return mkl_gemm() and _C.has_mkl_bf16_gemm() and _onednn_bf16()


def pack(weight: torch.Tensor, rows: int) -> Packed | None:
    """MKL's packed form of an fp32 CPU ``weight`` (out, in) for GEMMs of exactly ``rows`` rows, to pass
    to ``linear(..., packed=)``; None where there is none (no MKL, another dtype or device, or autograd
    on): ``linear`` then takes its usual path. It is a copy: a weight changed afterwards needs a new one."""
    if not (_mkl_packing() and weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and rows >= 1 and not torch.is_grad_enabled()):
        return None
    return Packed(torch.ops.mkl._mkl_reorder_linear_weight(weight.contiguous(), rows), rows)


def _onednn_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == x.dtype
        and x.numel() >= _ONEDNN_MIN_ROWS * x.shape[-1]
        and _onednn_built()
        and (x.dtype == torch.float32 or _onednn_bf16())
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None,
           packed: Packed | None = None):
    """``F.linear(x, weight, bias)``, then ``activation`` (None or "gelu", the exact erf GELU).

    ``packed``: :func:`pack` of ``weight``, used where x is 2-D fp32 with autograd off (with as many
    rows as it was packed for; MKL computes any other count from ``weight``); otherwise ignored."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"linear: activation must be one of {_ACTIVATIONS}; got {activation!r}")
    if packed is not None and x.dim() == 2 and x.dtype == torch.float32 and not torch.is_grad_enabled():
        y = torch.ops.mkl._mkl_linear(x, packed.weight, weight, bias, packed.rows)
        return F.gelu(y) if activation == "gelu" else y
    if _onednn_usable(x, weight):
        if activation == "gelu":
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    y = F.linear(x, weight, bias)
    return F.gelu(y) if activation == "gelu" else y
