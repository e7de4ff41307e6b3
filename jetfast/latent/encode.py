"""Encoding every jet of a run to codes (``jetfast encode``).

Every jet of the run's split is passed through the VAE encoder (posterior mean ``mu``),
quantized against the run's bins (``bins.npz``) and written, batch by batch, with its class,
the posterior's width around ``mu`` and, when the jet file has them, its generator-level
``pt`` and ``m0``, to a codes file (:mod:`jetfast.latent.codes`; default ``RUN_DIR/codes.h5``). Images are never held in
memory. What quantizing costs (per-dimension RMS error relative to the latent spread,
and the change of the decoded images, in model space and in GeV) is returned and saved
as ``RUN_DIR/encode_report.json``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from jetfast import ops
from jetfast.bins import load_bins
from jetfast.errors import RunDirError
from jetfast.latent.codes import CodesWriter, split_labels
from jetfast.latent.encoder import QuantizationCost, RunEncoder
from jetfast.run import SPLITS, write_json


def encode_run(
    run_dir,
    *,
    data=None,
    out=None,
    overwrite: bool = False,
    batch_size: int = 256,
    checkpoint: str = "best",
    report_jets: int = 512,
    device=None,
    num_threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Write the codes of every jet of a run's split to ``out`` (default ``RUN_DIR/codes.h5``)
    and ``RUN_DIR/encode_report.json``; return the report.

    ``data`` is the jet file (default: the one the run was trained on); ``checkpoint`` the
    VAE checkpoint ("best" or "last"); ``report_jets`` how many jets are decoded twice to
    measure the image change.
    """
    start = time.perf_counter()
    encoder = RunEncoder(run_dir, data, checkpoint, device, num_threads)
    run = encoder.run
    centers, bins_meta = load_bins(run.bins_path)
    latent_dim, num_bins = centers.shape
    if latent_dim != encoder.vae_config.latent_dim:
        raise RunDirError(
            f"{run.bins_path} has {latent_dim} dimensions but the VAE has {encoder.vae_config.latent_dim}: "
            f"refit the bins with `jetfast fit-bins {run.path}`"
        )
    out = Path(out) if out else run.codes_path
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it (or choose another --out)")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, row_split = split_labels(encoder.split, encoder.file_jets)
    if len(rows) == 0:
        raise RunDirError(f"the run's split ({run.split_path}) holds no jets")
    outside = encoder.file_jets - len(rows)
    if outside:
        print(f"jetfast encode: note: {outside} jets of {encoder.data} are in none of the run's train/val/test "
              "splits (train-vae --max-jets) and are not encoded", file=sys.stderr)

    code_dtype = ops.code_dtype_for(num_bins)
    code_dtype_name = str(code_dtype).split(".")[1]
    centers_t = torch.from_numpy(centers)
    cost = QuantizationCost(encoder, report_jets)
    with CodesWriter(out, rows, row_split, centers, code_dtype_name, kinematics=encoder.kinematics,
                     run_dir=str(run.path.resolve()), data=encoder.data, checkpoint=checkpoint,
                     bins_method=str(bins_meta.get("method", ""))) as writer:
        for mu, batch in encoder.batches(rows, batch_size, "encode", progress):
            codes = ops.quantize(mu, centers_t, out_dtype=code_dtype)
            cost.add(mu, ops.dequantize(codes, centers_t), batch["conditions"])
            writer.write(batch["index"].numpy(), codes.numpy(), batch["y"].numpy(), batch["posterior_std"].numpy(),
                         **{key: batch[key].numpy() for key in encoder.kinematics})

    report = {
        "command": "encode",
        "codes_file": str(out.resolve()),
        "data": encoder.data,
        "checkpoint": checkpoint,
        "num_jets": int(len(rows)),
        "jets_per_split": {name: int((row_split == value).sum()) for value, name in enumerate(SPLITS)},
        "num_bins": int(num_bins),
        "latent_dim": int(latent_dim),
        "code_dtype": code_dtype_name,
        **cost.result(),
        "seconds": time.perf_counter() - start,
        "report_file": str(run.encode_report_path),
    }
    write_json(run.encode_report_path, report)
    return report
