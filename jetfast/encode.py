"""``jetfast encode``: the latent codes of a run's jets, for the code Transformer.

Every jet of the run's split is passed through the VAE encoder (posterior mean
``mu``), quantized against the run's bins (``bins.npz`` from ``jetfast fit-bins``)
and written, batch by batch, to an HDF5 codes file (default ``RUN_DIR/codes.h5``)::

    codes    (N, D) uint8    bin index per latent dimension (int16/int32 when K > 256)
    y        (N,)   float32  class label, as in the jet file
    split    (N,)   uint8    0 train, 1 val, 2 test (the VAE run's split.npz)
    index    (N,)   int64    row of the jet in the jet file
    centers  (D, K) float32  the bin centers the codes index
    attrs    num_bins, latent_dim, run_dir, data, checkpoint, bins_method, jetfast_version

Images are never held in memory: the file is written to ``*.tmp`` as batches arrive
and renamed into place only when complete. A report of what quantising costs (per-
dimension RMS error relative to the latent spread, and the change of the decoded
images, in model space and in GeV) is printed and saved as ``RUN_DIR/encode_report.json``.

This module also holds the pieces ``jetfast fit-bins`` shares: encoding a set of jets
to latents, and measuring how quantising changes the decoded images.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from jetfast.errors import InvalidArgument, JetFileError, RunDirError

DESCRIPTION = "encode a run's jets to latent codes (HDF5) with its VAE and bins"
SPLIT_NAMES = ("train", "val", "test")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a `jetfast train-vae` run with bins.npz from `jetfast fit-bins`")
    parser.add_argument("--data", default=None, help="the jet file (default: the one the run was trained on)")
    parser.add_argument("--out", default=None, help="codes file to write (default: RUN_DIR/codes.h5)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing codes file")
    add_encoder_arguments(parser)


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared with ``jetfast fit-bins``."""
    parser.add_argument("--batch-size", type=int, default=256, help="jets per encoder batch (default: %(default)s)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which VAE checkpoint to use (default: %(default)s)")
    parser.add_argument("--report-jets", type=int, default=512,
                        help="jets decoded twice, from mu and from the codes, to measure the image change (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device for the VAE (default: cuda if available, else cpu)")
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from jetfast.errors import USER_ERRORS

    try:
        report = encode(args)
    except USER_ERRORS as exc:
        print(f"jetfast encode: error: {exc}", file=sys.stderr)
        return 2
    print(format_report("jetfast encode", report), file=sys.stderr)
    print(f"jetfast encode: wrote {report['codes_file']} ({report['num_jets']} jets x {report['latent_dim']} codes) "
          f"in {report['seconds']:.1f} s; report in {report['report_file']}", file=sys.stderr)
    return 0


# -- shared with fit-bins -------------------------------------------------------------------------
class EncoderContext:
    """A run's VAE, its intensity transform and its jet file, checked against each other."""

    def __init__(self, run_dir, data=None, checkpoint: str = "best", device=None, num_threads=None):
        import torch

        from jetfast.data.format import validate_jet_file
        from jetfast.models.vae import load_vae
        from jetfast.run import RunDir, check_split_fits, load_split

        self.run = RunDir(run_dir)
        if not self.run.path.is_dir():
            raise FileNotFoundError(f"run directory not found: {self.run.path}")
        self.data = os.path.abspath(self.run.data_file(data))
        self.file_jets = validate_jet_file(self.data)
        self.split = load_split(self.run)
        check_split_fits(self.split, self.file_jets, self.data)
        if num_threads is not None:
            if num_threads < 1:
                raise InvalidArgument(f"--num-threads must be >= 1; got {num_threads}")
            torch.set_num_threads(num_threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.checkpoint = checkpoint
        self.model, self.transform, self.vae_config = load_vae(self.run.path, which=checkpoint, map_location=self.device)

    def batches(self, indices, batch_size: int, desc: str, progress: bool = True):
        """Yield ``(mu (B, D) float32 CPU tensor, batch dict)`` over ``indices``, in file order."""
        import torch
        from tqdm.auto import tqdm

        from jetfast.data.loader import JetLoader

        if batch_size < 1:
            raise InvalidArgument(f"--batch-size must be >= 1; got {batch_size}")
        loader = JetLoader(self.data, batch_size, indices=indices, shuffle=False, transform=self.transform,
                           keys=("X_jets", "y"), rank=0, world_size=1)
        with loader, torch.inference_mode(), tqdm(total=loader.num_jets, desc=desc, unit="jet", disable=not progress,
                                                  leave=False) as bar:
            for batch in loader:
                mu, _ = self.model.encode(batch["X_jets"].to(self.device, non_blocking=True))
                mu = mu.float().cpu()
                if not torch.isfinite(mu).all():
                    row = int((~torch.isfinite(mu)).any(dim=1).nonzero()[0, 0])
                    raise JetFileError(f"the encoder returned non-finite latents for jet {int(batch['index'][row])} "
                                     f"of {self.data}; check that jet and the checkpoint")
                yield mu, batch
                bar.update(len(mu))


class ImageChange:
    """How quantising changes decoded images: decode(dequantize(codes)) against decode(mu).

    Accumulates, per channel (Tracks, ECAL, HCAL), the mean squared difference over the
    125x125 image in model space and in GeV, and the mean square of decode(mu) in GeV as
    the scale to compare against, over at most ``max_jets`` jets.
    """

    CHANNELS = ("tracks", "ecal", "hcal")

    def __init__(self, model, transform, max_jets: int):
        import numpy as np

        if max_jets < 0:
            raise InvalidArgument(f"--report-jets must be >= 0; got {max_jets}")
        self.model, self.transform, self.max_jets = model, transform, int(max_jets)
        self.jets = 0
        self.sq_model = np.zeros(3)
        self.sq_gev = np.zeros(3)
        self.signal_gev = np.zeros(3)

    @property
    def full(self) -> bool:
        return self.jets >= self.max_jets

    def add(self, mu, z_hat) -> None:
        """mu and z_hat: (B, D) float32 CPU tensors (the latents and their dequantized codes)."""
        import torch

        from jetfast.data.transforms import crop_to_image

        take = min(len(mu), self.max_jets - self.jets)
        if take <= 0:
            return
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            x_mu = self.model.decode(mu[:take].to(device)).double().cpu()
            x_q = self.model.decode(z_hat[:take].to(device)).double().cpu()
        diff = crop_to_image(x_q - x_mu)  # (B, 125, 125, 3), model space
        pixels = diff.shape[1] * diff.shape[2]
        self.sq_model += diff.pow(2).sum(dim=(0, 1, 2)).numpy() / pixels
        gev_mu, gev_q = self.transform.to_images(x_mu), self.transform.to_images(x_q)
        self.sq_gev += (gev_q - gev_mu).pow(2).sum(dim=(0, 1, 2)).numpy() / pixels
        self.signal_gev += gev_mu.pow(2).sum(dim=(0, 1, 2)).numpy() / pixels
        self.jets += take

    def result(self) -> dict:
        import numpy as np

        jets = max(self.jets, 1)
        mse_gev = self.sq_gev / jets
        signal = self.signal_gev / jets
        relative = np.divide(mse_gev, signal, out=np.zeros(3), where=signal > 0)
        return {
            "jets": self.jets,
            "what": "decode(dequantize(quantize(mu))) vs decode(mu), per pixel of the 125x125 image",
            "mse_model": dict(zip(self.CHANNELS, (self.sq_model / jets).tolist())),
            "mse_gev2": dict(zip(self.CHANNELS, mse_gev.tolist())),
            "relative_mse": dict(zip(self.CHANNELS, relative.tolist())),
            "relative_mse_what": "mse_gev2 / mean square pixel of decode(mu)",
        }


class LatentError:
    """Streaming per-dimension RMS of mu - dequantize(quantize(mu)) and the std of mu."""

    def __init__(self, latent_dim: int):
        import numpy as np

        self.count = 0
        self.sq_error = np.zeros(latent_dim)
        self.sum = np.zeros(latent_dim)
        self.sum_sq = np.zeros(latent_dim)

    def add(self, mu, z_hat) -> None:
        mu = mu.double().numpy()
        self.count += len(mu)
        self.sq_error += ((z_hat.double().numpy() - mu) ** 2).sum(axis=0)
        self.sum += mu.sum(axis=0)
        self.sum_sq += (mu**2).sum(axis=0)

    def result(self) -> dict:
        import numpy as np

        n = max(self.count, 1)
        rms = np.sqrt(self.sq_error / n)
        std = np.sqrt(np.maximum(self.sum_sq / n - (self.sum / n) ** 2, 0.0))
        relative = np.divide(rms, std, out=np.zeros_like(rms), where=std > 0)
        return {
            "jets": self.count,
            "rms": rms.tolist(),
            "latent_std": std.tolist(),
            "relative_rms": relative.tolist(),
            "relative_rms_mean": float(relative.mean()),
            "relative_rms_max": float(relative.max()),
            "worst_dimension": int(relative.argmax()),
        }


def format_report(prefix: str, report: dict) -> str:
    latent = report["latent_error"]
    lines = [
        f"{prefix}: quantisation error (RMS of mu - bin center, relative to the std of mu) over {latent['jets']} jets: "
        f"mean {latent['relative_rms_mean']:.4f}, worst {latent['relative_rms_max']:.4f} (dimension {latent['worst_dimension']})"
    ]
    images = report.get("image_change")
    if images and images["jets"]:
        per_channel = ", ".join(
            f"{c} {images['mse_gev2'][c]:.3g} GeV^2 (relative {images['relative_mse'][c]:.3g})" for c in ImageChange.CHANNELS
        )
        lines.append(f"{prefix}: decoded-image change from quantising over {images['jets']} jets (MSE per pixel): {per_channel}")
    return "\n".join(lines)


# -- encode ---------------------------------------------------------------------------------------
def split_labels(split: dict, file_jets: int):
    """``(rows, split_of_row)``: the sorted jet indices of the run's split and 0/1/2 for each."""
    import numpy as np

    label = np.full(file_jets, 255, np.uint8)
    for value, name in enumerate(SPLIT_NAMES):
        if name in split:
            label[split[name]] = value
    rows = np.flatnonzero(label != 255)
    return rows, label[rows]


def encode(args: argparse.Namespace) -> dict:
    import h5py
    import numpy as np
    import torch

    import jetfast
    from jetfast.bins import load_bins
    from jetfast.ops import code_dtype_for, dequantize, quantize
    from jetfast.run import write_json

    start = time.perf_counter()
    context = EncoderContext(args.run_dir, args.data, args.checkpoint, args.device, args.num_threads)
    centers, bins_meta = load_bins(context.run.path)
    latent_dim, num_bins = centers.shape
    if latent_dim != context.vae_config.latent_dim:
        raise RunDirError(
            f"{context.run.bins_path} has {latent_dim} dimensions but the VAE has {context.vae_config.latent_dim}: "
            f"refit the bins with `jetfast fit-bins {context.run.path}`"
        )
    out = Path(args.out) if args.out else context.run.codes_path
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it (or choose another --out)")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, row_split = split_labels(context.split, context.file_jets)
    if len(rows) == 0:
        raise RunDirError(f"the run's split ({context.run.split_path}) holds no jets")
    outside = context.file_jets - len(rows)
    if outside:
        print(f"jetfast encode: note: {outside} jets of {context.data} are in none of the run's train/val/test "
              "splits (train-vae --max-jets) and are not encoded", file=sys.stderr)

    code_dtype = code_dtype_for(num_bins)
    centers_t = torch.from_numpy(centers)
    latent_error = LatentError(latent_dim)
    image_change = ImageChange(context.model, context.transform, args.report_jets)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as handle:
            chunk = (min(len(rows), 4096), latent_dim)
            codes_ds = handle.create_dataset("codes", (len(rows), latent_dim), dtype=np.dtype(str(code_dtype).split(".")[1]),
                                             chunks=chunk)
            y_ds = handle.create_dataset("y", (len(rows),), dtype=np.float32)
            handle.create_dataset("split", data=row_split)
            handle.create_dataset("index", data=rows.astype(np.int64))
            handle.create_dataset("centers", data=centers)
            handle.attrs.update({
                "num_bins": num_bins,
                "latent_dim": latent_dim,
                "run_dir": str(context.run.path.resolve()),
                "data": context.data,
                "checkpoint": args.checkpoint,
                "bins_method": str(bins_meta.get("method", "")),
                "split_values": "0 train, 1 val, 2 test",
                "jetfast_version": jetfast.__version__,
            })
            for mu, batch in context.batches(rows, args.batch_size, "encode", not args.no_progress):
                codes = quantize(mu, centers_t, out_dtype=code_dtype)
                z_hat = dequantize(codes, centers_t)
                latent_error.add(mu, z_hat)
                image_change.add(mu, z_hat)
                # The loader reads in file order; place each batch at its rows anyway.
                where = np.searchsorted(rows, batch["index"].numpy())
                order = np.argsort(where, kind="stable")
                where = where[order]
                codes_np, y_np = codes.numpy()[order], batch["y"].numpy()[order].astype(np.float32)
                if len(where) and where[-1] - where[0] == len(where) - 1:
                    codes_ds[where[0] : where[-1] + 1] = codes_np
                    y_ds[where[0] : where[-1] + 1] = y_np
                else:
                    codes_ds[where] = codes_np
                    y_ds[where] = y_np
            if latent_error.count != len(rows):
                raise RuntimeError(f"encoded {latent_error.count} jets but expected {len(rows)}")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()

    report = {
        "command": "encode",
        "codes_file": str(out.resolve()),
        "data": context.data,
        "checkpoint": args.checkpoint,
        "num_jets": int(len(rows)),
        "jets_per_split": {name: int((row_split == value).sum()) for value, name in enumerate(SPLIT_NAMES)},
        "num_bins": int(num_bins),
        "latent_dim": int(latent_dim),
        "code_dtype": str(code_dtype).split(".")[1],
        "latent_error": latent_error.result(),
        "image_change": image_change.result(),
        "seconds": time.perf_counter() - start,
        "report_file": str(context.run.encode_report_path),
    }
    write_json(context.run.encode_report_path, report)
    return report
