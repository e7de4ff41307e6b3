"""Torch-facing native ops.

Each op is a ``torch.library.custom_op`` with a ``register_fake`` that checks
shapes, so models that use them trace under ``torch.compile``. The compiled module
does not link libtorch: CPU tensors reach it as NumPy views (no copy) and CUDA
tensors as device pointers plus the caller's current stream.
"""

from __future__ import annotations

import numpy as np
import torch

from jetfast._ext import cuda_built, require_native

__all__ = ["quantize", "dequantize", "code_dtype_for"]

_CODE_TYPES = {torch.uint8: 0, torch.int16: 1, torch.int32: 2}
_MAX_BINS = {torch.uint8: 256, torch.int16: 32768, torch.int32: 65536}
_MAX_DIMS = 4096


def code_dtype_for(num_bins: int) -> torch.dtype:
    """The smallest code dtype that holds ``num_bins`` bins."""
    if num_bins <= 256:
        return torch.uint8
    if num_bins <= 32768:
        return torch.int16
    return torch.int32


def _check_centers(centers: torch.Tensor, d: int | None, what: str) -> None:
    if not isinstance(centers, torch.Tensor) or centers.dtype != torch.float32:
        raise TypeError(f"{what}: centers must be a float32 tensor; got {getattr(centers, 'dtype', type(centers))}")
    if centers.ndim != 2:
        raise ValueError(f"{what}: centers must be (D, K); got shape {tuple(centers.shape)}")
    dims, bins = centers.shape
    if d is not None and dims != d:
        raise ValueError(f"{what}: centers has D={dims} rows but the input has D={d} columns")
    if not 1 <= dims <= _MAX_DIMS:
        raise ValueError(f"{what}: need 1 <= D <= {_MAX_DIMS}; got D={dims}")
    if not 2 <= bins <= 65536:
        raise ValueError(f"{what}: need 2 <= K <= 65536 bins; got K={bins}")


def _check_centers_values(centers: torch.Tensor, what: str) -> None:
    # (D, K) is small: these checks cost nothing next to the op.
    if not torch.isfinite(centers).all():
        raise ValueError(f"{what}: centers contain NaN or inf; every center must be finite")
    steps = centers[:, 1:] - centers[:, :-1]
    if (steps < 0).any():
        row = int((steps < 0).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"{what}: centers must be sorted ascending in every row; row {row} is not")


def _stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _require_cuda_kernels(what: str):
    if not cuda_built():
        raise RuntimeError(
            f"{what}: got CUDA tensors but this jetfast build has no CUDA kernels; "
            "rebuild with nvcc on PATH (make build JETFAST_CUDA=ON)"
        )


# --------------------------------------------------------------------------------------
# quantize
# --------------------------------------------------------------------------------------
@torch.library.custom_op("jetfast::quantize", mutates_args=())
def _quantize_op(z: torch.Tensor, centers: torch.Tensor, out_dtype: torch.dtype, num_threads: int) -> torch.Tensor:
    # Value checks live inside the op: it is opaque to torch.compile, so they do not
    # break the graph.
    _check_centers_values(centers, "quantize")
    n, d = z.shape
    codes = torch.empty((n, d), dtype=out_dtype, device=z.device)
    if n == 0:
        return codes
    centers = centers.contiguous()
    native = require_native()
    if z.device.type == "cpu":
        threads = num_threads or torch.get_num_threads()
        nan_at = native.quantize_cpu(z.detach().numpy(), centers.detach().numpy(), codes.numpy(), threads)
        if nan_at >= 0:
            raise ValueError(f"quantize: z contains NaN (first found at row {nan_at // d}, column {nan_at % d})")
        return codes
    _require_cuda_kernels("quantize")
    with torch.cuda.device(z.device):
        levels = max(1, int(np.ceil(np.log2(centers.shape[1]))))
        table = torch.empty((d, 1 << levels), dtype=torch.float64, device=z.device)
        flag = torch.zeros((), dtype=torch.int32, device=z.device)
        native.quantize_cuda(
            z.data_ptr(), n, d, z.stride(0), z.stride(1), centers.data_ptr(), centers.shape[1],
            table.data_ptr(), codes.data_ptr(), _CODE_TYPES[out_dtype], flag.data_ptr(), _stream_handle(z.device),
        )
        if int(flag.item()):
            raise ValueError("quantize: z contains NaN")
    return codes


@_quantize_op.register_fake
def _(z, centers, out_dtype, num_threads):
    torch._check(z.ndim == 2, lambda: f"quantize: z must be (N, D); got {tuple(z.shape)}")
    torch._check(centers.ndim == 2 and centers.shape[0] == z.shape[1], lambda: "quantize: centers must be (D, K)")
    return z.new_empty(z.shape, dtype=out_dtype)


def quantize(z, centers, out_dtype: torch.dtype | None = None, num_threads: int | None = None):
    """Index of the nearest center for every latent value.

    Args:
        z: (N, D) float32 latents, a torch tensor (CPU or CUDA) or a NumPy array.
        centers: (D, K) float32 bin centers, each row sorted ascending (duplicates allowed).
        out_dtype: torch.uint8 (K <= 256, the default then), torch.int16 (K <= 32768,
            the default up to there) or torch.int32.
        num_threads: CPU threads; default ``torch.get_num_threads()``.

    Returns:
        codes (N, D) of ``out_dtype`` (a NumPy array if ``z`` was one), where
        ``codes[n, d]`` is the index of the center of row d nearest to ``z[n, d]`` in
        exact arithmetic; a value exactly on a midpoint goes to the lower index, -inf to
        0 and +inf to K-1. NaN in ``z`` or ``centers`` raises ``ValueError``.
    """
    as_numpy = isinstance(z, np.ndarray)
    z = _as_tensor(z, "z")
    centers = _as_tensor(centers, "centers")
    if z.dtype != torch.float32:
        raise TypeError(f"quantize: z must be float32; got {z.dtype}")
    if z.ndim != 2:
        raise ValueError(f"quantize: z must be (N, D); got shape {tuple(z.shape)}")
    _check_centers(centers, z.shape[1], "quantize")
    if centers.device != z.device:
        raise ValueError(f"quantize: z is on {z.device} but centers are on {centers.device}")
    bins = centers.shape[1]
    out_dtype = code_dtype_for(bins) if out_dtype is None else out_dtype
    if out_dtype not in _CODE_TYPES:
        raise TypeError(f"quantize: out_dtype must be torch.uint8, torch.int16 or torch.int32; got {out_dtype}")
    if bins > _MAX_BINS[out_dtype]:
        raise ValueError(f"quantize: {out_dtype} cannot hold K={bins} bins (max {_MAX_BINS[out_dtype]})")
    # 0 = torch's thread count, resolved inside the op (torch.compile cannot trace the query).
    threads = 0 if num_threads is None else int(num_threads)
    if num_threads is not None and threads < 1:
        raise ValueError(f"quantize: num_threads must be >= 1; got {threads}")
    codes = _quantize_op(z, centers, out_dtype, threads)
    return codes.numpy() if as_numpy else codes


# --------------------------------------------------------------------------------------
# dequantize
# --------------------------------------------------------------------------------------
@torch.library.custom_op("jetfast::dequantize", mutates_args=())
def _dequantize_op(codes: torch.Tensor, centers: torch.Tensor, num_threads: int) -> torch.Tensor:
    # The same centers quantize accepts, and no others: NaN or unsorted rows are refused here too.
    _check_centers_values(centers, "dequantize")
    n, d = codes.shape
    z_hat = torch.empty((n, d), dtype=torch.float32, device=codes.device)
    if n == 0:
        return z_hat
    codes = codes.contiguous()
    centers = centers.contiguous()
    native = require_native()
    if codes.device.type == "cpu":
        threads = num_threads or torch.get_num_threads()
        bad_at = native.dequantize_cpu(codes.numpy(), centers.numpy(), z_hat.numpy(), threads)
        if bad_at >= 0:
            code = int(codes.view(-1)[bad_at])
            raise ValueError(
                f"dequantize: code {code} at row {bad_at // d}, column {bad_at % d} is outside [0, {centers.shape[1]})"
            )
        return z_hat
    _require_cuda_kernels("dequantize")
    with torch.cuda.device(codes.device):
        flag = torch.zeros((), dtype=torch.int32, device=codes.device)
        native.dequantize_cuda(
            codes.data_ptr(), _CODE_TYPES[codes.dtype], n, d, centers.data_ptr(), centers.shape[1],
            z_hat.data_ptr(), flag.data_ptr(), _stream_handle(codes.device),
        )
        if int(flag.item()):
            raise ValueError(f"dequantize: codes outside [0, {centers.shape[1]})")
    return z_hat


@_dequantize_op.register_fake
def _(codes, centers, num_threads):
    torch._check(codes.ndim == 2, lambda: f"dequantize: codes must be (N, D); got {tuple(codes.shape)}")
    torch._check(centers.ndim == 2 and centers.shape[0] == codes.shape[1], lambda: "dequantize: centers must be (D, K)")
    return codes.new_empty(codes.shape, dtype=torch.float32)


def dequantize(codes, centers, num_threads: int | None = None):
    """The inverse of :func:`quantize`: ``z_hat[n, d] = centers[d, codes[n, d]]``.

    ``codes`` (N, D) uint8/int16/int32 (torch or NumPy), ``centers`` (D, K) float32, checked
    as :func:`quantize` checks them (finite, every row sorted ascending). A code outside [0, K)
    raises ``ValueError``.
    """
    as_numpy = isinstance(codes, np.ndarray)
    codes = _as_tensor(codes, "codes")
    centers = _as_tensor(centers, "centers")
    if codes.dtype not in _CODE_TYPES:
        raise TypeError(f"dequantize: codes must be uint8, int16 or int32; got {codes.dtype}")
    if codes.ndim != 2:
        raise ValueError(f"dequantize: codes must be (N, D); got shape {tuple(codes.shape)}")
    _check_centers(centers, codes.shape[1], "dequantize")
    if centers.device != codes.device:
        raise ValueError(f"dequantize: codes are on {codes.device} but centers are on {centers.device}")
    threads = 0 if num_threads is None else max(1, int(num_threads))
    z_hat = _dequantize_op(codes, centers, threads)
    return z_hat.numpy() if as_numpy else z_hat


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray; got {type(x).__name__}")
from jetfast.kernels.decode_attention import decode_attention  # noqa: E402,F401
