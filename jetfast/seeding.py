"""Per-jet random streams: what a jet draws depends on (seed, its index), never on batching.

The sampler draws a jet's codes, and the VAE's sparse decoder its hits and intensities,
from a torch generator seeded by :func:`jet_generators`, so a jet is the same whatever
``batch_size`` it was made in, and an interrupted run can be continued to the same file.
Different ``stream`` values give independent streams for the same jets (codes and pixels).
"""

from __future__ import annotations

from typing import Iterator

import torch

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    # Decorrelates neighbouring (seed, index) pairs; torch's CPU generator only
    # keeps 32 bits of a seed, so the mixed bits matter.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def jet_generators(seed: int, start: int, count: int, stream: int = 0) -> Iterator[torch.Generator]:
    """One CPU generator, reseeded for each of the jets ``start .. start + count - 1`` in turn."""
    base = splitmix64(seed & _MASK64)
    if stream:
        base = splitmix64(base ^ splitmix64(stream))
    generator = torch.Generator()
    for index in range(start, start + count):
        generator.manual_seed(splitmix64(base ^ index))
        yield generator


def jet_uniforms(seed: int, start: int, count: int, length: int, stream: int = 0) -> torch.Tensor:
    """Uniforms (count, length) in [0, 1); row i depends only on (seed, start + i, stream)."""
    out = torch.empty((count, length), dtype=torch.float32)
    for row, generator in enumerate(jet_generators(seed, start, count, stream)):
        torch.rand(length, generator=generator, out=out[row])
    return out
