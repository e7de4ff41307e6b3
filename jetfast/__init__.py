"""jetfast: fast generative simulation of quark/gluon jet images.

A convolutional VAE compresses 3-channel (Tracks, ECAL, HCAL) 125x125 jet images
into 128 latents, each latent is discretised into 256 bins, and a class-conditional
Transformer learns the resulting code sequences. Sampling codes, dequantising and
decoding produces synthetic jets in the input file's layout.
"""

from jetfast._ext import HAS_NATIVE, cuda_available, cuda_built
from jetfast.ops import dequantize, quantize

__version__ = "0.1.0"

__all__ = [
    "HAS_NATIVE",
    "cuda_available",
    "cuda_built",
    "dequantize",
    "quantize",
    "__version__",
]
