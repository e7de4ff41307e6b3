"""A run's VAE over its jets, and what quantizing its latents costs.

:class:`RunEncoder` checks a run's checkpoint, intensity transform and jet file against
each other and streams posterior means ``mu``; :class:`LatentError` and
:class:`ImageChange` measure quantization in latent space and in the decoded images.
``jetfast fit-bins`` (:mod:`.fit`) and ``jetfast encode`` (:mod:`.encode`) both use them.
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from jetfast.data.format import validate_jet_file
from jetfast.data.loader import JetLoader
from jetfast.data.transforms import crop_to_image
from jetfast.errors import InvalidArgument, JetFileError
from jetfast.latent.codes import KINEMATICS
from jetfast.models.vae import CONDITION_KEYS, batch_conditions, load_vae, loader_keys
from jetfast.run import RunDir, check_split_fits, load_split


class RunEncoder:
    """A run's VAE, its intensity transform and its jet file, checked against each other."""

    def __init__(self, run_dir, data=None, checkpoint: str = "best", device=None, num_threads=None):
        self.run = RunDir(run_dir)
        if not self.run.path.is_dir():
            raise FileNotFoundError(f"run directory not found: {self.run.path}")
        self.data = os.path.abspath(self.run.data_file(data))
        self.file_jets = validate_jet_file(self.data)
        with h5py.File(self.data, "r") as f:
            # The generator-level jet pT and mass, carried into the codes when the file has them.
            self.kinematics = tuple(key for key in KINEMATICS if key in f and f[key].shape == (self.file_jets,))
        self.split = load_split(self.run)
        check_split_fits(self.split, self.file_jets, self.data)
        if num_threads is not None:
            if num_threads < 1:
                raise InvalidArgument(f"--num-threads must be >= 1; got {num_threads}")
            torch.set_num_threads(num_threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.checkpoint = checkpoint
        self.model, self.transform, self.vae_config = load_vae(self.run.path, which=checkpoint, map_location=self.device)
        if self.vae_config.conditioned:
            validate_jet_file(self.data, CONDITION_KEYS)  # the encoder sees each jet's (y, pt, m0)

    def batches(self, indices, batch_size: int, desc: str, progress: bool = True):
        """Yield ``(mu (B, D) float32 CPU tensor, batch dict)`` over ``indices``, in file order; the
        batch's ``"conditions"`` are the jets' (B, 3) (y, pt, m0) for a conditioned VAE, else None,
        and its ``"posterior_std"`` the (B, D) float32 widths of the posterior around ``mu``."""
        if batch_size < 1:
            raise InvalidArgument(f"--batch-size must be >= 1; got {batch_size}")
        loader = JetLoader(self.data, batch_size, indices=indices, shuffle=False, transform=self.transform,
                           keys=loader_keys(self.vae_config, "X_jets", "y", *self.kinematics), rank=0, world_size=1)
        with loader, torch.inference_mode(), tqdm(total=loader.num_jets, desc=desc, unit="jet", disable=not progress,
                                                  leave=False) as bar:
            for batch in loader:
                batch["conditions"] = batch_conditions(batch, self.vae_config)
                conditions = None if batch["conditions"] is None else batch["conditions"].to(self.device)
                mu, logvar = self.model.encode(batch["X_jets"].to(self.device, non_blocking=True), conditions)
                mu = mu.float().cpu()
                batch["posterior_std"] = (0.5 * logvar.float()).exp().cpu()
                bad = ~(torch.isfinite(mu) & torch.isfinite(batch["posterior_std"]))
                if bad.any():
                    row = int(bad.any(dim=1).nonzero()[0, 0])
                    raise JetFileError(f"the encoder returned non-finite latents for jet {int(batch['index'][row])} "
                                       f"of {self.data}; check that jet and the checkpoint")
                yield mu, batch
                bar.update(len(mu))


class ImageChange:
    """How quantizing changes decoded images: decode(dequantize(codes)) against decode(mu),
    both the expected image of the observation model.

    Accumulates, per channel (Tracks, ECAL, HCAL), the mean squared difference over the
    125x125 image in model space and in GeV, and the mean square of decode(mu) in GeV as
    the scale to compare against, over at most ``max_jets`` jets.
    """

    CHANNELS = ("tracks", "ecal", "hcal")

    def __init__(self, model, transform, max_jets: int):
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

    def add(self, mu, z_hat, conditions=None) -> None:
        """mu and z_hat: (B, D) float32 CPU tensors (the latents and their dequantized codes);
        conditions: their jets' (B, 3) for a conditioned VAE."""
        take = min(len(mu), self.max_jets - self.jets)
        if take <= 0:
            return
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            # Expected images: deterministic, so the difference is the quantization's alone.
            conditions = None if conditions is None else conditions[:take].to(device)
            gev_mu = self.model.images(mu[:take].to(device), self.transform, conditions, mode="mean").double().cpu()
            gev_q = self.model.images(z_hat[:take].to(device), self.transform, conditions, mode="mean").double().cpu()
        diff = crop_to_image(self.transform.to_model(gev_q) - self.transform.to_model(gev_mu))  # model space
        pixels = diff.shape[1] * diff.shape[2]
        self.sq_model += diff.pow(2).sum(dim=(0, 1, 2)).numpy() / pixels
        self.sq_gev += (gev_q - gev_mu).pow(2).sum(dim=(0, 1, 2)).numpy() / pixels
        self.signal_gev += gev_mu.pow(2).sum(dim=(0, 1, 2)).numpy() / pixels
        self.jets += take

    def result(self) -> dict:
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


class QuantizationCost:
    """Both measures of what quantizing costs, fed the same latents and dequantized codes."""

    def __init__(self, encoder: RunEncoder, report_jets: int):
        self.latent_error = LatentError(encoder.vae_config.latent_dim)
        self.image_change = ImageChange(encoder.model, encoder.transform, report_jets)

    @property
    def jets(self) -> int:
        return self.latent_error.count

    def add(self, mu, z_hat, conditions=None) -> None:
        self.latent_error.add(mu, z_hat)
        self.image_change.add(mu, z_hat, conditions)

    def result(self) -> dict:
        """``{"latent_error": ..., "image_change": ...}`` for the reports."""
        return {"latent_error": self.latent_error.result(), "image_change": self.image_change.result()}


def format_report(prefix: str, report: dict) -> str:
    latent = report["latent_error"]
    lines = [
        f"{prefix}: quantization error (RMS of mu - bin center, relative to the std of mu) over {latent['jets']} jets: "
        f"mean {latent['relative_rms_mean']:.4f}, worst {latent['relative_rms_max']:.4f} (dimension {latent['worst_dimension']})"
    ]
    images = report.get("image_change")
    if images and images["jets"]:
        per_channel = ", ".join(
            f"{c} {images['mse_gev2'][c]:.3g} GeV^2 (relative {images['relative_mse'][c]:.3g})" for c in ImageChange.CHANNELS
        )
        lines.append(f"{prefix}: decoded-image change from quantizing over {images['jets']} jets (MSE per pixel): {per_channel}")
    return "\n".join(lines)
