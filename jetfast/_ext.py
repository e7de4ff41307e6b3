"""Loads the compiled module ``jetfast._C`` without ever failing at import.

Everything that needs it asks :func:`require_native`, which raises a clear error
naming how to build it; pure-Python fallbacks check :data:`HAS_NATIVE` instead.
"""

from __future__ import annotations

try:
    from jetfast import _C  # type: ignore[attr-defined]

    HAS_NATIVE = True
    NATIVE_IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    HAS_NATIVE = False
    NATIVE_IMPORT_ERROR = exc


def require_native():
    """Return the compiled module, or raise an error that says how to get it."""
    if _C is None:
        raise RuntimeError(
            "jetfast's compiled extension jetfast._C is not available "
            f"({NATIVE_IMPORT_ERROR}). Build it with `make build` "
            "(or `pip install --no-build-isolation -e .`)."
        )
    return _C


def cuda_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return bool(_C is not None and _C.built_with_cuda)


def cuda_available() -> bool:
    """True when the extension has CUDA kernels *and* a CUDA device is usable.

    Decided from the build and the runtime, never by importing anything that
    fails without a GPU.
    """
    if not cuda_built():
        return False
    import torch

    return torch.cuda.is_available() and _C.cuda_device_count() > 0
