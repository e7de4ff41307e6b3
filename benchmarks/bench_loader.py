"""Jet loading throughput: 8192 jets, LZF chunks of 32, batches of 256 transformed
(B, 3, 128, 128) float32 tensors, JetLoader beside the two h5py baselines.

Baselines in the same run:
- (a) h5py behind a torch DataLoader (num_workers=2): a per-index Dataset that opens
  the file lazily in each worker, then pads, transposes and transforms each jet;
  the usual way this file gets read. Timed on a slice, scaled per jet.
- (b) the best single-process h5py read: sequential whole-chunk reads
  ``ds[i:i+32]`` with no transform at all (less work than the loader does).

Floor, per jet: LZF decode of 187.5 KB (these synthetic jets compress ~65x, to
~3 KB, so decoding is mostly run-length memsets: ~10-15 us) plus writing 192 KB of
model layout (filling 192 KB alone takes ~8 us at ~25 GB/s; the transposing,
transforming write measures ~17-20 us on one core). So ~30-35 us of CPU per jet:
~30k jets/s per core, ~60k jets/s on two quiet cores; the loader's own CPU time
per jet measured about that (under load). Real CMS jets compress less (more lit
pixels), which moves the balance toward decode.
"""

from __future__ import annotations


import h5py
import numpy as np
import pytest
import torch

from jetfast.data.loader import JetLoader
from jetfast.data.transforms import IntensityTransform
from tests.jetfiles import jet_images

N_JETS, CHUNK, BATCH = 8192, 32, 256
_images_per_s: dict[str, float] = {}


@pytest.fixture(scope="session")
def jet_file(tmp_path_factory):
    """The 8192-jet LZF file (1.5 GB uncompressed), written in blocks to keep memory low."""
    path = tmp_path_factory.mktemp("bench_loader") / "jets_lzf.h5"
    block = 512
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("X_jets", (N_JETS, 125, 125, 3), np.float32, chunks=(CHUNK, 125, 125, 3), compression="lzf")
        labels = np.empty(N_JETS, np.float32)
        for start in range(0, N_JETS, block):
            images, labels[start : start + block] = jet_images(block, seed=start)
            ds[start : start + block] = images
        f["y"] = labels
        f["pt"] = np.ones(N_JETS, np.float32)
        f["m0"] = np.ones(N_JETS, np.float32)
    return path


@pytest.fixture(scope="session")
def transform():
    return IntensityTransform.fit(jet_images(256, seed=12345)[0])


class PerJetDataset(torch.utils.data.Dataset):
    """What a plain PyTorch pipeline does: one h5py read per jet, then pad + transform."""

    def __init__(self, path, transform):
        self.path, self.transform, self.file = path, transform, None

    def __len__(self):
        return N_JETS

    def __getitem__(self, i):
        if self.file is None:  # opened in the worker, never before the fork
            self.file = h5py.File(self.path, "r")
        image = torch.from_numpy(self.file["X_jets"][i])
        return self.transform.to_model(image[None])[0], float(self.file["y"][i])


def test_h5py_dataloader(benchmark, record, jet_file, transform):
    jets = 1024  # ~5 s at the expected ~190 jets/s; scaled per jet
    order = torch.randperm(N_JETS, generator=torch.Generator().manual_seed(0))[:jets].tolist()
    loader = torch.utils.data.DataLoader(
        PerJetDataset(jet_file, transform), batch_size=BATCH, sampler=order, num_workers=2
    )

    def epoch():
        for images, _ in loader:
            pass

    benchmark.pedantic(epoch, rounds=1, warmup_rounds=0)
    _images_per_s["dataloader"] = jets / benchmark.stats.stats.min
    record(images_per_s=_images_per_s["dataloader"], timed_jets=jets)


def test_h5py_sequential_chunks(benchmark, record, jet_file):
    def read_all():
        with h5py.File(jet_file, "r") as f:
            ds = f["X_jets"]
            for start in range(0, N_JETS, CHUNK):
                ds[start : start + CHUNK]

    benchmark.pedantic(read_all, rounds=2, warmup_rounds=0)
    _images_per_s["sequential"] = N_JETS / benchmark.stats.stats.min
    record(images_per_s=_images_per_s["sequential"], transform="none")


@pytest.mark.parametrize("backend", ["native"])
def test_jetloader(benchmark, record, jet_file, transform, backend):
    loader = JetLoader(jet_file, BATCH, transform=transform, backend=backend, seed=0)

    def epoch():
        for batch in loader:
            pass

    epoch()  # warm-up: page cache, buffer ring
    benchmark.pedantic(epoch, rounds=3, warmup_rounds=0)
    rate = N_JETS / benchmark.stats.stats.min
    figures = dict(images_per_s=rate, threads=loader.num_threads)
    if "dataloader" in _images_per_s:
        figures["x_vs_h5py_dataloader"] = rate / _images_per_s["dataloader"]
    if "sequential" in _images_per_s:
        figures["x_vs_h5py_sequential"] = rate / _images_per_s["sequential"]
    record(**figures)
    loader.close()
