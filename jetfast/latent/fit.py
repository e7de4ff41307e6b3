"""Fitting the latent bins of a trained VAE run (``jetfast fit-bins``).

The training jets of the run (``split.npz``), or a random subset of them (``max_jets``),
are encoded to their posterior means ``mu``; K-Means then places ``num_bins`` centers on
every latent dimension (see :mod:`jetfast.bins`). Writes, atomically, into the run directory::

    bins.npz            centers (D, K) float32, rows sorted; method, num_bins, num_vectors,
                        seed, inertia (D,) float64, relative_rms (D,), checkpoint, data
    bins_report.json    the fit (method, sizes, time) and what quantizing costs: the RMS
                        error per dimension relative to the latent spread, and the change
                        of the decoded images in model space and in GeV

Then :func:`jetfast.latent.encode.encode_run` writes the codes of every jet with these bins.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from jetfast import bins, ops
from jetfast.errors import BinFitError, InvalidArgument
from jetfast.latent.encoder import QuantizationCost, RunEncoder
from jetfast.run import write_json


def training_subset(train, max_jets: int | None, seed: int) -> np.ndarray:
    """The training jets to fit on: all, or a seeded random subset in file order."""
    train = np.sort(np.asarray(train, np.int64))
    if max_jets is None or max_jets >= len(train):
        return train
    if max_jets < 1:
        raise InvalidArgument(f"--max-jets must be >= 1; got {max_jets}")
    return np.sort(np.random.default_rng(seed).choice(train, size=max_jets, replace=False))


def fit_run_bins(
    run_dir,
    *,
    data=None,
    num_bins: int = 256,
    method: str = "lloyd1d",
    max_jets: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    checkpoint: str = "best",
    report_jets: int = 512,
    device=None,
    num_threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Fit ``num_bins`` bins per latent dimension on a run's training jets; write bins.npz and
    bins_report.json into the run directory and return the report.

    ``data`` is the jet file (default: the one the run was trained on); ``checkpoint`` the
    VAE checkpoint ("best" or "last"); ``report_jets`` how many jets are decoded twice to
    measure the image change; ``seed`` draws the ``max_jets`` subset and seeds faiss.
    """
    start = time.perf_counter()
    bins.check_num_bins(num_bins)
    encoder = RunEncoder(run_dir, data, checkpoint, device, num_threads)
    jets = training_subset(encoder.split.get("train", []), max_jets, seed)
    if len(jets) < num_bins:
        raise BinFitError(
            f"the run has {len(jets)} training jets{' in the --max-jets subset' if max_jets else ''}, "
            f"fewer than --num-bins {num_bins}; ask for fewer bins"
        )

    latents = np.empty((len(jets), encoder.vae_config.latent_dim), np.float32)
    conditions = np.empty((len(jets), 3), np.float32) if encoder.vae_config.conditioned else None
    filled = 0
    for mu, batch in encoder.batches(jets, batch_size, "fit-bins: encode", progress):
        latents[filled : filled + len(mu)] = mu.numpy()
        if conditions is not None:
            conditions[filled : filled + len(mu)] = batch["conditions"].numpy()
        filled += len(mu)
    if filled != len(jets):
        raise RuntimeError(f"encoded {filled} jets but expected {len(jets)}")
    encode_seconds = time.perf_counter() - start

    centers, info = bins.fit_bins_with_info(latents, num_bins, method, seed=seed, num_threads=torch.get_num_threads())
    inertia = bins.inertia(latents, centers)

    # What quantizing costs, measured on the latents the bins were fitted on.
    centers_t = torch.from_numpy(centers)
    cost = QuantizationCost(encoder, report_jets)
    for begin in range(0, len(latents), batch_size):
        mu = torch.from_numpy(latents[begin : begin + batch_size])
        jets_conditions = None if conditions is None else torch.from_numpy(conditions[begin : begin + batch_size])
        cost.add(mu, ops.dequantize(ops.quantize(mu, centers_t), centers_t), jets_conditions)
    measured = cost.result()

    run = encoder.run
    bins.save_bins(
        run.bins_path, centers, method=method, num_bins=num_bins, num_vectors=len(jets), seed=seed, inertia=inertia,
        relative_rms=np.asarray(measured["latent_error"]["relative_rms"]), checkpoint=checkpoint, data=encoder.data,
    )
    report = {
        "command": "fit-bins",
        "bins_file": str(run.bins_path.resolve()),
        "data": encoder.data,
        "checkpoint": checkpoint,
        "method": method,
        "num_bins": int(num_bins),
        "latent_dim": int(latents.shape[1]),
        "num_vectors": int(len(jets)),
        "seed": int(seed),
        "encode_seconds": encode_seconds,
        "fit_seconds": info["fit_seconds"],
        "inertia": inertia.tolist(),
        "distinct_values": info.get("distinct_values"),
        "iterations": info.get("iterations"),
        **measured,
    }
    write_json(run.bins_report_path, report)
    return report
