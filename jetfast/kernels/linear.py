"""Linear layers for inference: oneDNN on the CPU, with the activation fused.

In CPU sampling the Transformer's GEMMs are (batch x d_model) by (d_model x 4 d_model)
and smaller, where PyTorch's default CPU GEMM plus a separate GELU pass over the
(batch x 4 d_model) activations leaves about 10-25% on the table: oneDNN's linear
with a fused GELU is what ``torch.compile``'s CPU backend emits for the same
pattern. It has no backward, so it is used only where autograd is off; everything
else (training, CUDA, other dtypes) takes ``F.linear``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["linear"]

_ACTIVATIONS = (None, "gelu")


@functools.cache
def _onednn_built() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == x.dtype
        and _onednn_built()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None):
    """``F.linear(x, weight, bias)``, then ``activation`` (None or "gelu", the exact erf GELU)."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"linear: activation must be one of {_ACTIVATIONS}; got {activation!r}")
    if _onednn_usable(x, weight):
        if activation == "gelu":
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    y = F.linear(x, weight, bias)
    return F.gelu(y) if activation == "gelu" else y
