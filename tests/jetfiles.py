"""Small jet-like HDF5 files in the ML4SCI layout, for tests that need a file fast.

Not physics: sparse random deposits around the image centre (Tracks and ECAL as
single pixels, HCAL as constant 5x5 blocks of tower/25, as in the real file), a
balanced label, and pt/m0 stored as float32. The Pythia generator makes the real
thing; these files exist so loader, training and evaluation tests run in seconds.
"""

from __future__ import annotations

import h5py
import numpy as np


def jet_images(n: int, seed: int = 0, size: int = 125) -> tuple[np.ndarray, np.ndarray]:
    """Return (images (n,125,125,3) float32, labels (n,) float32 in {0,1})."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size, 3), np.float32)
    labels = (np.arange(n) % 2).astype(np.float32)
    rng.shuffle(labels)
    center = size // 2
    for i in range(n):
        width = 4.0 if labels[i] == 1 else 7.0  # "quarks" narrower than "gluons"
        count = rng.integers(10, 40) if labels[i] == 1 else rng.integers(20, 70)
        for channel in (0, 1):
            rows = np.clip(np.round(rng.normal(center, width, count)), 0, size - 1).astype(int)
            cols = np.clip(np.round(rng.normal(center, width, count)), 0, size - 1).astype(int)
            np.add.at(images[i, :, :, channel], (rows, cols), rng.exponential(2.0, count).astype(np.float32))
        towers = rng.integers(3, 10)
        for _ in range(towers):
            r0 = int(np.clip(rng.normal(center, width), 0, size - 5)) // 5 * 5
            c0 = int(np.clip(rng.normal(center, width), 0, size - 5)) // 5 * 5
            images[i, r0 : r0 + 5, c0 : c0 + 5, 2] += np.float32(rng.exponential(3.0) / 25.0)
    return images, labels


def write_jet_file(
    path,
    n: int = 100,
    seed: int = 0,
    compression: str | None = "lzf",
    shuffle: bool = False,
    chunk: int | None = 32,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
):
    """Write a jet file; compression is 'lzf', 'gzip' or None; chunk=None means contiguous."""
    if images is None:
        images, labels = jet_images(n, seed)
    n = len(images)
    pt = np.nansum(images.reshape(n, -1), axis=1).astype(np.float32)  # a NaN pixel leaves the jet's pT finite
    m0 = (0.1 * pt).astype(np.float32)
    with h5py.File(path, "w") as f:
        kwargs = {}
        if chunk is not None:
            kwargs = dict(chunks=(min(chunk, max(n, 1)), 125, 125, 3), compression=compression, shuffle=shuffle)
        f.create_dataset("X_jets", data=images, **kwargs)
        f.create_dataset("y", data=labels.astype(np.float32))
        f.create_dataset("pt", data=pt)
        f.create_dataset("m0", data=m0)
    return images, labels


def damage_chunk(path, chunk: int, where: str = "middle", nbytes: int = 4096, seed: int = 0) -> tuple[int, int]:
    """Overwrite ``nbytes`` of the stored ``X_jets`` chunk ``chunk`` with random bytes, at its
    start (LZF then fails to decode) or in its middle (it may decode, to garbage); return
    the chunk's (file offset, size)."""
    with h5py.File(path, "r") as f:
        info = f["X_jets"].id.get_chunk_info(chunk)
    nbytes = min(nbytes, info.size // 2)
    start = info.byte_offset + (0 if where == "start" else (info.size - nbytes) // 2)
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(np.random.default_rng(seed).bytes(nbytes))
    return info.byte_offset, info.size
