"""VAE training throughput on the CPU: default model (latent 128, widths 32-64-128-256), batch 64.

Two data paths feed the same model and the same optimiser step in the same run:

- jetfast: ``JetLoader`` (C++ prefetcher when built with HDF5, h5py chunk reader otherwise)
  delivering padded (B, 3, 128, 128) batches in GeV, as ``train-vae`` reads them, then the
  trainer's step: the transform for the encoder, the sparse observation model's loss on the
  jets in GeV, the training loop's optimizer step (``jetfast.train.loop.optimize``), in the
  precision ``train-vae`` picks (bf16 autocast where the CPU has it);
- baseline: the plain PyTorch recipe, a per-index ``h5py`` ``Dataset`` (one file handle per
  worker, opened lazily after the fork) + ``DataLoader`` with one worker, default collate,
  then the same step. With 32-jet LZF chunks (6 MB) and h5py's default 1 MiB chunk
  cache, every per-index read decodes a whole chunk: that is what the plain recipe costs on
  files chunked like this one.

Each side runs a warm-up step and then a few timed steps; images/s is in
``benchmark.extra_info``. The data path alone (no model) is timed too, since on a CPU the
model step dominates and hides the loader's cost.
"""

from __future__ import annotations

import time

import h5py
import pytest
import torch

from jetfast.data.loader import JetLoader
from jetfast.data.transforms import IntensityTransform, crop_to_image, pad_to_model
from jetfast.models.vae import VAE, VAEConfig
from jetfast.train.loop import autocast_context, optimize, resolve_precision
from tests.jetfiles import write_jet_file

BATCH = 64
STEPS = 3  # timed steps per side after one warm-up step
N_JETS = BATCH * (STEPS + 1) * 2


@pytest.fixture(scope="module")
def jet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench_vae") / "jets.h5"
    images, _ = write_jet_file(path, n=N_JETS, seed=0, compression="lzf", chunk=32)
    return path, IntensityTransform.fit(images[:256])


class H5PerIndex(torch.utils.data.Dataset):
    """The usual h5py Dataset: one jet per __getitem__, the file opened once per worker."""

    def __init__(self, path, transform: IntensityTransform):
        self.path, self.transform, self.file = path, transform, None
        with h5py.File(path, "r") as f:
            self.n = len(f["y"])

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.file is None:  # after the fork: never share an h5py handle across processes
            self.file = h5py.File(self.path, "r")
        return torch.from_numpy(self.file["X_jets"][i]), float(self.file["y"][i])


def _baseline_loader(path, transform):
    return torch.utils.data.DataLoader(H5PerIndex(path, transform), batch_size=BATCH, shuffle=True, num_workers=1,
                                       drop_last=True, persistent_workers=False, generator=torch.Generator().manual_seed(0))


def _jetfast_loader(path, transform):
    return JetLoader(path, BATCH, shuffle=True, seed=0, drop_last=True, transform=None, rank=0, world_size=1)


def _physical(batch):
    """The batch as train-vae's step takes it: padded (B, 3, 128, 128) in GeV."""
    return batch["X_jets"] if isinstance(batch, dict) else pad_to_model(batch[0])


PRECISION = resolve_precision("auto", torch.device("cpu"))
AUTOCAST = autocast_context(PRECISION, torch.device("cpu"))


def _train_step(model, optimizer, transform, physical, step: int) -> None:
    """One step of the trainer: transform, the VAE's loss terms, the training loop's optimizer step."""
    x, images = transform.forward(physical), crop_to_image(physical)
    with AUTOCAST():
        loss = model.loss(x, *model(x), 1.0, images=images)["loss"]
    optimize(model, optimizer, loss, grad_clip=5.0, step=step)


def _train(loader, transform, steps: int) -> float:
    """Seconds for ``steps`` training steps after one warm-up step (loader time included)."""
    torch.manual_seed(0)
    model = VAE(VAEConfig()).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batches = iter(loader)
    _train_step(model, optimizer, transform, _physical(next(batches)), 0)
    start = time.perf_counter()
    for step in range(steps):
        _train_step(model, optimizer, transform, _physical(next(batches)), step + 1)
    return time.perf_counter() - start


def _read(loader) -> tuple[float, int]:
    batches = iter(loader)
    next(batches)  # warm-up: worker start-up, first chunk decode
    start, jets = time.perf_counter(), 0
    for batch in batches:
        jets += _physical(batch).shape[0]
    return time.perf_counter() - start, jets


@pytest.mark.parametrize("side", ["jetfast", "baseline"])
def test_vae_training_images_per_s(benchmark, record, jet_file, side):
    path, transform = jet_file
    make = _jetfast_loader if side == "jetfast" else _baseline_loader
    seconds = benchmark.pedantic(lambda: _train(make(path, transform), transform, STEPS), rounds=1, iterations=1)
    backend = make(path, transform).backend if side == "jetfast" else "h5py per-index DataLoader(num_workers=1)"
    record(train_images_per_s=BATCH * STEPS / seconds, batch=BATCH, threads=torch.get_num_threads(), data=backend,
           precision=PRECISION)


@pytest.mark.parametrize("side", ["jetfast", "baseline"])
def test_vae_data_path_images_per_s(benchmark, record, jet_file, side):
    path, transform = jet_file
    make = _jetfast_loader if side == "jetfast" else _baseline_loader
    seconds, jets = benchmark.pedantic(lambda: _read(make(path, transform)), rounds=1, iterations=1)
    record(load_images_per_s=jets / seconds, batch=BATCH)
