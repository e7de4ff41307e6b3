"""The convolutional VAE of stage 1: (B, 3, 128, 128) jet images <-> 128 latents.

Encoder: four stride-2 3x3 convolutions (3 -> 32 -> 64 -> 128 -> 256 channels,
128 -> 8 pixels per side), each with BatchNorm and LeakyReLU(0.2); the 256x8x8 map is
flattened and mapped linearly to the posterior mean ``mu`` and log-variance ``logvar``.
Decoder: the mirror image with transposed convolutions and a linear output.

What the decoder's output means is the observation model, ``recon``:

* ``"sparse"`` (the default): per pixel and channel the probability that the pixel is hit and
  a log-normal intensity when it is, HCAL at its 25 x 25 tower resolution
  (:mod:`jetfast.models.observation`); the reconstruction term is the negative log-likelihood
  of the image in GeV, and decoded jets are drawn from it (or its mean is taken);
* ``"mse"``: squared error on the log-standardised image (``F.mse_loss(reduction="sum")`` per
  image), i.e. a Gaussian of fixed variance 1/2 in transformed units, which makes the decoder
  predict the conditional mean: a diffuse image, non-zero on every pixel;
* ``"gaussian_nll"``: the same with a learned per-channel variance.

The last two are kept for comparison; they decode to their mean, with HCAL averaged over
its towers.

``conditioned``: the encoder and the decoder also see the generator-level jet, its class
``y``, pT ``pt`` and mass ``m0`` (:data:`CONDITION_KEYS`), as a fast detector simulation
does: the decoder renders the detector image of a given jet, so the latents need only hold
what the detector adds to it (the response, the shower shapes), and the prior is the same
for every jet. The features (y, log pt, log(1 + m0)) are standardised with the training
jets' mean and std and joined to the flattened encoder features and to the latent. Every term is summed over pixels (latents for the KL) and averaged over the
batch; ``beta`` weights the KL and :meth:`VAE.beta_at` ramps it in over ``kl_warmup_steps``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import nn

from jetfast.data.format import MODEL_SIZE
from jetfast.data.transforms import IntensityTransform
from jetfast.errors import InvalidArgument, RunDirError
from jetfast.models.observation import (
    COUPLED,
    NUM_CHANNELS,
    TOTALS_BASES,
    SparseObservation,
    SparseOutput,
    params_per_channel,
)
from jetfast.run import checkpoint_file, load_checkpoint
from jetfast.sim.detector import cells_to_towers, towers_to_cells

RECON_KINDS = ("sparse", "mse", "gaussian_nll")
CONDITION_KEYS = ("y", "pt", "m0")  # the generator-level jet a conditioned VAE decodes for
DECODE_MODES = ("sample", "mean")
DECODE_PRECISIONS = ("fp32", "bf16")  # as the sampler's (jetfast.generation.sampler.PRECISIONS)


@dataclass
class VAEConfig:
    latent_dim: int = 128
    widths: tuple[int, ...] = (32, 64, 128, 256)
    in_channels: int = 3
    image_size: int = MODEL_SIZE
    beta: float = 1.0
    recon: str = "sparse"
    intensity_components: int = 3  # recon="sparse": log-normals in each pixel's intensity mixture
    kl_warmup_steps: int = 0
    negative_slope: float = 0.2
    # recon="sparse": the training hits' statistics (jetfast.models.observation.hit_statistics),
    # per channel: fraction of hit pixels (HCAL: towers), mean and std of log(hit value / GeV).
    hit_occupancy: tuple[float, float, float] = (0.01, 0.01, 0.01)
    hit_log_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    hit_log_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # recon="sparse": a head for each channel's total (see jetfast.models.observation), in units of
    # the training jets' mean and std of log(channel total / GeV).
    channel_totals: bool = False
    total_correlations: bool = False  # with channel_totals: the totals drawn with a full covariance
    total_log_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    total_log_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # with channel_totals: the coordinates of the totals' Gaussian (jetfast.models.observation.TOTALS_BASES)
    # and pixel intensities as shares of their channel's total
    totals_basis: str = "channels"
    pixel_shares: bool = False
    # with channel_totals: a head for each channel's number of hits (HCAL: towers), a discretised
    # log-normal of 1 + hits in units of the training jets' mean and std of log(1 + hits)
    hit_counts: bool = False
    count_log_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    count_log_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # with hit_counts: the decoder is also given each channel's number of hits (the jet's own in
    # training, drawn from the count head in sampling), so it places the hits given how many
    count_conditioned: bool = False
    # with hit_counts: the occupancy is trained as it is sampled, shifted (one shift of all logits)
    # to the jet's number of hits (jetfast.models.observation.count_shift)
    count_calibrated: bool = False
    # Conditioning on the generator-level jet (y, pt, m0): the training jets' mean and std of
    # the features (y, log pt, log(1 + m0)).
    conditioned: bool = False
    condition_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    condition_std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        for name in ("hit_occupancy", "hit_log_mean", "hit_log_std", "total_log_mean", "total_log_std",
                     "count_log_mean", "count_log_std", "condition_mean", "condition_std"):
            setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        if self.latent_dim < 1:
            raise InvalidArgument(f"latent_dim must be >= 1; got {self.latent_dim}")
        if not self.widths or min(self.widths) < 1:
            raise InvalidArgument(f"widths must be positive channel counts; got {self.widths}")
        if self.image_size % (2 ** len(self.widths)):
            raise InvalidArgument(
                f"image_size {self.image_size} is not divisible by 2**{len(self.widths)} "
                f"(one halving per encoder stage of widths={self.widths})"
            )
        if self.recon not in RECON_KINDS:
            raise InvalidArgument(f"recon must be one of {RECON_KINDS}; got {self.recon!r}")
        if self.intensity_components < 1:
            raise InvalidArgument(f"intensity_components must be >= 1; got {self.intensity_components}")
        if self.totals_basis not in TOTALS_BASES:
            raise InvalidArgument(f"totals_basis must be one of {TOTALS_BASES}; got {self.totals_basis!r}")
        if self.hit_counts and not (self.recon == "sparse" and self.channel_totals):
            raise InvalidArgument("hit_counts needs the sparse observation model with channel_totals: "
                                  "the counts come from the totals' head")
        if self.count_calibrated and not self.hit_counts:
            raise InvalidArgument("count_calibrated needs hit_counts: the occupancy is calibrated to the counts")
        if self.count_conditioned and not self.hit_counts:
            raise InvalidArgument("count_conditioned needs hit_counts: the decoder is given the counts the head draws")
        if self.pixel_shares and not (self.recon == "sparse" and self.channel_totals):
            raise InvalidArgument("pixel_shares needs the sparse observation model with channel_totals: "
                                  "the shares are scaled to the drawn totals")
        if self.beta < 0 or self.kl_warmup_steps < 0:
            raise InvalidArgument(f"beta and kl_warmup_steps must be >= 0; got {self.beta}, {self.kl_warmup_steps}")

    @property
    def bottleneck_size(self) -> int:
        """Pixels per side of the deepest feature map (8 for 128 px and four stages)."""
        return self.image_size // 2 ** len(self.widths)

    @property
    def condition_size(self) -> int:
        """Features of the generator-level jet joined to the encoder's features and the latent."""
        return len(CONDITION_KEYS) if self.conditioned else 0

    @property
    def output_channels(self) -> int:
        """Decoder output channels: (hit logit, loc, log scale) per image channel when sparse."""
        return self.in_channels * (params_per_channel(self.intensity_components) if self.recon == "sparse" else 1)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def condition_features(conditions: torch.Tensor) -> torch.Tensor:
    """(B, 3) generator-level jets (y, pt / GeV, m0 / GeV) -> (y, log pt, log(1 + m0)), float32."""
    conditions = conditions.float()
    return torch.stack([conditions[:, 0], conditions[:, 1].log(), conditions[:, 2].log1p()], dim=1)


def loader_keys(config: VAEConfig, *keys: str) -> tuple[str, ...]:
    """``keys`` and, for a VAE conditioned on the jets, (y, pt, m0): what a JetLoader must read."""
    return tuple(dict.fromkeys((*keys, *(CONDITION_KEYS if config.conditioned else ()))))


def batch_conditions(batch: dict, config: VAEConfig) -> torch.Tensor | None:
    """The (B, 3) conditions (y, pt, m0) of a JetLoader batch read with :func:`loader_keys`, or
    None for a VAE not conditioned on the jets."""
    return torch.stack([batch[key].float() for key in CONDITION_KEYS], dim=1) if config.conditioned else None


def read_conditions(path: str, rows) -> torch.Tensor:
    """The (y, pt, m0) (N, 3) float32 of the jets at file rows ``rows``, in the order of ``rows``."""
    import h5py

    rows = np.asarray(rows)
    with h5py.File(path, "r") as f:
        return torch.from_numpy(np.stack([np.asarray(f[key][...], np.float32)[rows] for key in CONDITION_KEYS], axis=1))


def _down(c_in: int, c_out: int, slope: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(slope, inplace=True),
    )


def _up(c_in: int, c_out: int, slope: float) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(slope, inplace=True),
    )


class VAE(nn.Module):
    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        widths, slope, side = config.widths, config.negative_slope, config.bottleneck_size
        chans = (config.in_channels, *widths)
        self.encoder = nn.Sequential(*[_down(a, b, slope) for a, b in zip(chans[:-1], chans[1:])])
        flat = widths[-1] * side * side  # 256 * 8 * 8 = 16384 by default
        extra = config.condition_size
        self.to_mu = nn.Linear(flat + extra, config.latent_dim)
        self.to_logvar = nn.Linear(flat + extra, config.latent_dim)
        counted = NUM_CHANNELS if config.count_conditioned else 0
        self.from_latent = nn.Linear(config.latent_dim + extra + counted, flat)
        rev = widths[::-1]
        self.decoder = nn.Sequential(
            *[_up(a, b, slope) for a, b in zip(rev[:-1], rev[1:])],
            # Last stage: no BatchNorm/activation; the outputs are unbounded (log-odds, log-intensities).
            nn.ConvTranspose2d(rev[-1], config.output_channels, 3, stride=2, padding=1, output_padding=1),
        )
        self.observation = SparseObservation(config.hit_log_mean, config.hit_log_std, config.intensity_components,
                                             config.total_log_mean, config.total_log_std,
                                             totals_basis=config.totals_basis, pixel_shares=config.pixel_shares,
                                             count_log_mean=config.count_log_mean if config.hit_counts else None,
                                             count_log_std=config.count_log_std if config.hit_counts else None,
                                             count_calibrated=config.count_calibrated)
        if config.recon == "sparse":
            self.observation.init_output_bias(self.decoder[-1].bias, config.hit_occupancy)
        self.totals = None
        if config.recon == "sparse" and config.channel_totals:
            # (loc, log scale) of each channel's standardised log total, from the latent directly:
            # a jet's energy is a global property, not a pixel's.
            couplings = len(COUPLED) if config.total_correlations else 0
            counts = 2 * config.in_channels if config.hit_counts else 0
            self.totals = nn.Sequential(nn.Linear(config.latent_dim + extra, 256), nn.LeakyReLU(slope),
                                        nn.Linear(256, 2 * config.in_channels + couplings + counts))
        # Learned per-channel log-variance of the pixel likelihood (used by recon="gaussian_nll").
        self.log_sigma2 = nn.Parameter(torch.zeros(config.in_channels), requires_grad=config.recon == "gaussian_nll")
        # Start with a near-deterministic posterior: a large initial logvar would drown the
        # signal in sampling noise during the first epochs.
        nn.init.zeros_(self.to_logvar.weight)
        nn.init.constant_(self.to_logvar.bias, -4.0)
        # Channels-last convolutions skip oneDNN's layout reorders on CPUs (measured 1.1-1.3x
        # training images/s on 2 AVX-512 cores) and suit tensor cores on GPUs.
        self.to(memory_format=torch.channels_last)
        self.register_buffer("condition_mean", torch.tensor(config.condition_mean), persistent=False)
        self.register_buffer("condition_std", torch.tensor(config.condition_std), persistent=False)
        # The training jets' (y, pt, m0), set by load_vae: generation draws the jets to decode
        # for from them when it is not told (jetfast.generation.conditions).
        self.training_jets: torch.Tensor | None = None

    def _with_conditions(self, h: torch.Tensor, conditions: torch.Tensor | None, where: str) -> torch.Tensor:
        """``h`` (B, F) joined to the standardised conditions (B, 3) when the VAE is conditioned."""
        if not self.config.conditioned:
            return h  # a class-blind VAE ignores what it is told about the jets
        if conditions is None:
            raise InvalidArgument(f"VAE.{where}: this VAE is conditioned on the generator-level jets (y, pt, m0): "
                                  "pass conditions=(B, 3) (jetfast.models.vae.batch_conditions makes them from a batch)")
        if conditions.shape != (h.shape[0], len(CONDITION_KEYS)):
            raise ValueError(f"VAE.{where} expects conditions of shape ({h.shape[0]}, 3) (y, pt, m0); "
                             f"got {tuple(conditions.shape)}")
        features = (condition_features(conditions.to(h.device)) - self.condition_mean) / self.condition_std
        if not torch.isfinite(features).all():
            raise InvalidArgument(f"VAE.{where}: conditions must have pt > 0 and m0 >= 0 GeV, all finite")
        return torch.cat([h, features.to(h.dtype)], dim=1)

    def encode(self, x: torch.Tensor, conditions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, 128, 128) transformed images (and their jets' (B, 3) conditions when the VAE is
        conditioned) -> (mu, logvar), each (B, latent_dim)."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"VAE.encode expects (B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}); got {tuple(x.shape)}"
            )
        h = self.encoder(x.contiguous(memory_format=torch.channels_last))
        h = self._with_conditions(h.flatten(1), conditions, "encode")  # (B, 256*8*8 [+ 3]), NCHW order
        return self.to_mu(h), self.to_logvar(h).clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, conditions: torch.Tensor | None = None,
               hits: torch.Tensor | None = None) -> SparseOutput | torch.Tensor:
        """(B, latent_dim) (and the jets' (B, 3) conditions when the VAE is conditioned) -> the
        decoder output: for the sparse observation model a
        :class:`~jetfast.models.observation.SparseOutput` (pixel parameters (B, C, 128, 128) and
        channel totals (B, 3, 2) or None), else the mean image in transformed units (B, 3, 128, 128).
        A ``count_conditioned`` VAE places the pixels for ``hits`` (B, 3) hits per channel (HCAL:
        towers); without them, for the count head's median."""
        cfg = self.config
        if z.ndim != 2 or z.shape[1] != cfg.latent_dim:
            raise ValueError(f"VAE.decode expects (B, {cfg.latent_dim}); got {tuple(z.shape)}")
        side = cfg.bottleneck_size
        z = self._with_conditions(z, conditions, "decode")
        heads = self._heads(z) if cfg.recon == "sparse" and self.totals is not None else SparseOutput(None, None)
        h = z
        if cfg.count_conditioned:
            if hits is None:
                hits = self.observation.draw_counts(heads)
            elif hits.shape != (z.shape[0], NUM_CHANNELS):
                raise ValueError(f"VAE.decode expects hits of shape ({z.shape[0]}, {NUM_CHANNELS}); got {tuple(hits.shape)}")
            h = torch.cat([z, self.observation.count_features(hits.to(z.device)).to(z.dtype)], dim=1)
        h = self.from_latent(h).view(-1, cfg.widths[-1], side, side)  # (B, 256, 8, 8)
        pixels = self.decoder(h.contiguous(memory_format=torch.channels_last))
        if cfg.recon != "sparse":
            return pixels
        return heads._replace(pixels=pixels)

    def _heads(self, z: torch.Tensor) -> SparseOutput:
        """The heads of the jet's sums from the latent joined to the conditions: a SparseOutput
        without pixels (totals, couplings, counts)."""
        cfg = self.config
        heads = self.totals(z)
        counts = 2 * cfg.in_channels if cfg.hit_counts else 0
        totals, couplings, counts = heads.split(
            [2 * cfg.in_channels, heads.shape[1] - 2 * cfg.in_channels - counts, counts], dim=1)
        return SparseOutput(None, totals.reshape(-1, cfg.in_channels, 2), couplings if couplings.shape[1] else None,
                            counts.reshape(-1, cfg.in_channels, 2) if cfg.hit_counts else None)

    def forward(self, x: torch.Tensor, conditions: torch.Tensor | None = None,
                hits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (decoder output, mu, logvar); samples z in training mode, uses z = mu in eval mode.
        A ``count_conditioned`` VAE is trained with the jets' own ``hits`` (B, 3) (see :meth:`decode`)."""
        mu, logvar = self.encode(x, conditions)
        if self.training:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        else:
            z = mu
        return self.decode(z, conditions, hits), mu, logvar

    def beta_at(self, step: int) -> float:
        """KL weight at optimiser step ``step``: linear warm-up to ``config.beta``."""
        warmup = self.config.kl_warmup_steps
        if warmup <= 0:
            return self.config.beta
        return self.config.beta * min(1.0, (step + 1) / warmup)

    def loss(self, x, out, mu, logvar, beta: float | None = None, images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``dict(loss, recon, kl, ...)``, each a scalar averaged over the batch (summed over pixels/latents).

        ``x`` is the transformed batch the encoder saw, ``out`` the decoder output; the sparse
        model scores ``images``, the same jets in GeV (B, 125, 125, 3), and adds its terms per
        channel (``tracks_hits``, ``tracks_energy``, ...).
        """
        beta = self.config.beta if beta is None else beta
        terms = {}
        if self.config.recon == "sparse":
            if images is None:
                raise InvalidArgument("the sparse observation model scores the images in GeV: pass images=")
            per_jet = self.observation.nll(out, images)
            recon = sum(per_jet.values())
            terms = {name: value.mean() for name, value in per_jet.items()}
        elif self.config.recon == "mse":
            recon = (out.float() - x).pow(2).flatten(1).sum(1)
        else:  # gaussian_nll
            log_s2 = self.log_sigma2.view(1, -1, 1, 1)
            recon = (0.5 * ((out.float() - x).pow(2) * torch.exp(-log_s2) + log_s2 + math.log(2 * math.pi))).flatten(1).sum(1)
        kl = (-0.5 * (1 + logvar.float() - mu.float().pow(2) - logvar.float().exp())).sum(1).mean()
        recon = recon.mean()
        return {"loss": recon + beta * kl, "recon": recon, "kl": kl, **terms}

    @torch.no_grad()
    def images(self, z: torch.Tensor, transform: IntensityTransform, conditions: torch.Tensor | None = None, *,
               mode: str = "sample", seed: int = 0, start: int = 0, precision: str = "fp32") -> torch.Tensor:
        """Decode latents (B, latent_dim) (for the jets ``conditions`` (B, 3), when the VAE is
        conditioned) to jets (B, 125, 125, 3) in GeV, in the file layout.

        ``mode="sample"`` draws each pixel's hit and intensity (jet i from the stream of
        ``(seed, start + i)``, so a jet does not depend on the batch it is decoded in);
        ``"mean"`` gives the expected image. The Gaussian likelihoods (``mse``,
        ``gaussian_nll``) always give their mean, with HCAL averaged over the detector's towers.
        ``precision="bf16"`` runs the decoder under bf16 autocast (about twice the fp32 rate of
        its convolutions on CPUs and GPUs with bf16 units); the observation model draws in fp32.
        """
        if mode not in DECODE_MODES:
            raise InvalidArgument(f"decoding mode must be one of {DECODE_MODES}; got {mode!r}")
        if precision not in DECODE_PRECISIONS:
            raise InvalidArgument(f"decoding precision must be one of {DECODE_PRECISIONS}; got {precision!r}")
        noise, hits = None, None
        if mode == "sample" and self.config.count_conditioned:
            # The counts first (from the jet's own stream, as the sampling below draws them), then
            # the pixels for them.
            noise = self.observation.noise(seed, start, z.shape[0])
            heads = self._heads(self._with_conditions(z, conditions, "decode"))
            hits = self.observation.draw_counts(heads, noise[1][:, NUM_CHANNELS:])
        with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = self.decode(z, conditions, hits)
        if precision == "bf16":
            if isinstance(out, SparseOutput):
                # The pixels stay bf16: the observation model widens what it reads (the hit logits, the
                # hits' intensities), where a copy of the whole output took a quarter of a decode.
                out = SparseOutput(out.pixels, *(None if t is None else t.float() for t in out[1:]))
            else:
                out = out.float()
        if self.config.recon == "sparse":
            return self.observation.sample(out, seed, start, noise) if mode == "sample" else self.observation.mean(out)
        images = transform.to_images(out.float())
        images[..., 2] = towers_to_cells(cells_to_towers(images[..., 2]))
        return images


def load_vae(run_dir_or_checkpoint: str | os.PathLike, which: str = "best", map_location="cpu"):
    """Load a trained VAE for downstream stages.

    ``run_dir_or_checkpoint`` is a ``jetfast train-vae`` run directory (then
    ``checkpoints/{which}.pt`` is read) or a checkpoint file. Returns
    ``(model.eval(), IntensityTransform, VAEConfig)``.
    """
    path = checkpoint_file(run_dir_or_checkpoint, which, command="train-vae")
    state = load_checkpoint(path, map_location=map_location)
    for key in ("model", "vae_config", "transform"):
        if key not in state:
            raise RunDirError(f"{path} is not a jetfast VAE checkpoint (missing {key!r}; keys: {sorted(state)})")
    config = VAEConfig.from_dict(state["vae_config"])
    model = VAE(config)
    model.load_state_dict(state["model"])
    if "training_jets" in state:
        model.training_jets = torch.as_tensor(state["training_jets"], dtype=torch.float32)
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    return model.eval(), IntensityTransform.from_dict(state["transform"]), config
