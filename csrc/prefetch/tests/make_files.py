"""Writes the small HDF5 files the C++ prefetcher tests read, plus the expected jets.

Usage: python make_files.py OUTDIR. Each <name>.h5 holds the same N jets (LZF,
gzip+shuffle, contiguous, uncompressed chunks, chunks that cut the images); expected.f32 holds them raw
(N, 125, 125, 3) float32; corrupt.h5 is lzf.h5 with chunk 3 overwritten.
"""

import shutil
import sys
from pathlib import Path

import h5py
import numpy as np

N, CHUNK = 45, 7  # the last chunk is partial


def main(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    images = np.zeros((N, 125, 125, 3), np.float32)
    lit = rng.random(images.shape) < 0.02
    images[lit] = rng.exponential(2.0, lit.sum()).astype(np.float32)
    images[7:14] = rng.random((7, 125, 125, 3), dtype=np.float32)  # incompressible: stored raw by LZF
    layouts = {
        "lzf": dict(chunks=(CHUNK, 125, 125, 3), compression="lzf"),
        "gzip_shuffle": dict(chunks=(CHUNK, 125, 125, 3), compression="gzip", shuffle=True),
        "chunked_raw": dict(chunks=(CHUNK, 125, 125, 3)),
        "contiguous": dict(),
        "tiles": dict(chunks=(9, 16, 50, 2), compression="lzf"),  # chunks cut the images
    }
    for name, kwargs in layouts.items():
        with h5py.File(out / f"{name}.h5", "w") as f:
            f.create_dataset("X_jets", data=images, **kwargs)
            f["y"] = np.zeros(N, np.float32)
    images.tofile(out / "expected.f32")
    shutil.copy(out / "lzf.h5", out / "corrupt.h5")
    with h5py.File(out / "corrupt.h5", "r") as f:
        info = f["X_jets"].id.get_chunk_info(3)
    with open(out / "corrupt.h5", "r+b") as f:
        f.seek(info.byte_offset)
        f.write(b"\xff" * 32)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
