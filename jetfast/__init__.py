"""jetfast: fast generative simulation of quark/gluon jet images.

A convolutional VAE compresses 3-channel (Tracks, ECAL, HCAL) 125x125 jet images
into 128 latents, each latent is discretised into 256 bins, and a class-conditional
Transformer learns the resulting code sequences. Sampling codes, dequantising and
decoding produces synthetic jets in the input file's layout.

Attributes that need torch are imported on first use, so ``import jetfast`` (and
the worker processes of ``jetfast data generate``, and ``jetfast --help``) stay fast.
"""

from jetfast._ext import HAS_NATIVE, cuda_available, cuda_built

__version__ = "0.1.0"

_LAZY = {
    "quantize": ("jetfast.ops", "quantize"),
    "dequantize": ("jetfast.ops", "dequantize"),
    "sample": ("jetfast.generation.sampler", "sample"),
    "fit_bins": ("jetfast.bins", "fit_bins"),
    "JetLoader": ("jetfast.data.loader", "JetLoader"),
}

__all__ = ["HAS_NATIVE", "cuda_available", "cuda_built", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module_name, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jetfast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
