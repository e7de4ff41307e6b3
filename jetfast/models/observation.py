"""The sparse observation model of jet images: which pixels are hit, and how much.

A jet image is a few dozen hits on an empty window, so the decoder does not predict one
value per pixel (a squared error makes it predict the conditional mean, non-zero on every
pixel). Per pixel and channel it gives the probability that the pixel is hit,
``p = sigmoid(logit)``, and the distribution of its intensity when it is: a mixture of
``components`` log-normals,

    log x | hit  ~  sum_k w_k Normal(log_mean_c + log_std_c * loc_k,  (log_std_c * scale_k)^2),

where the weights ``w = softmax(weight logits)``, ``loc_k`` and ``log scale_k`` are decoder
outputs in units standardised per channel by the training hits' ``log_mean_c`` and
``log_std_c`` (fixed, saved with the model). One component is a plain log-normal; more let a
pixel be, say, either a noise hit or a photon (ECAL), whose log-energies a single Gaussian
would straddle with a wide, heavy-tailed fit. The log-likelihood of an image is the sum over
pixels of

    log(1 - p)                                        for an empty pixel,
    log p + log sum_k w_k Normal(log x; ...)          for a hit,

i.e. of the density of (hit, log x); the Jacobian 1/x does not depend on the model and is
left out. Pixels are independent given the latent.

HCAL is modelled at its own resolution: 25 x 25 towers of 5 x 5 cells, a tower's value being
its E_T (the sum of its 25 cells). The decoder's HCAL outputs are averaged over each tower's
cells, and decoded towers are spread over their cells by the detector model's own
:func:`~jetfast.sim.detector.towers_to_cells`, so generated HCAL always has the tower
structure of the files.

Channel totals (``totals``). Pixels drawn independently given the latent add their
intensity noise up in a jet's sums: the channel totals, and with them the jet pT, come out
far broader than the data's (the pT's spread 1.6 times the real one in a VAE with 128 used
latents). So the decoder also gives, from the latent, the distribution of each channel's
total (HCAL: of its towers), ``log T_c ~ Normal(loc_c, scale_c^2)`` in units standardised
by the training jets' ``total_log_mean``/``total_log_std``, whose negative log-likelihood
is one more term per channel (``<channel>_total``). A sampled jet draws its pixels, then its
totals, and scales each channel's pixels to its total: the pixels say where the energy goes
and how it is shared, the totals how much there is. The pixel terms alone are the density
of the pixels; the total term trains the head that draws the totals.

The three totals are not independent: a jet's energy is shared between its charged and
neutral particles, so Tracks, ECAL and HCAL fluctuate against each other while their sum
follows the jet's pT (drawn independently, the sum's spread came out twice the real one).
With ``couplings`` the head also gives, per jet, the strictly lower triangle ``r`` of a
Cholesky factor: ``x_c = loc_c + scale_c * (e_c + sum_{j<c} r_cj e_j)`` with ``e ~ N(0, I)``,
a full-covariance normal of the standardised log totals whose density is one term per
channel, ``log scale_c + e_c^2 / 2 + log(2 pi) / 2``, with ``e`` found by forward
substitution (an empty channel counts as ``e_j = 0`` in the channels after it).

The basis of the totals (``totals_basis``). ``"channels"``: the Gaussian is over (log T_tracks,
log T_ecal, log T_hcal). ``"calorimeter"``: over (log T_tracks, log C, log T_ecal - log T_hcal)
with C = T_ecal + T_hcal, the calorimeter sum and the logit of its electromagnetic fraction.
A jet's calorimeter sum follows its pT closely (the detector response) while the share of it
in ECAL swings widely (the photons of its pi0s); in the channel basis the two are tied into
log T_ecal and log T_hcal, whose joint law is not Gaussian (log T_hcal is skewed, with a heavy
tail), and a Gaussian with their covariance spreads the calorimeter sum 26% wider than the
data's. The map (log T_ecal, log T_hcal) -> (log C, logit) has Jacobian 1, so the two bases'
likelihoods compare directly. A coordinate that does not exist for a jet (an empty channel;
the fraction when ECAL or HCAL is empty) counts as ``e = 0`` and adds no term.

Pixel shares (``pixel_shares``). With totals, a sampled channel is scaled to its drawn
total, so only the pixels' relative sizes reach the jet; with ``pixel_shares`` the
intensities are modelled as such, ``log(x / T_c)`` with T_c the channel total of the
image, so that the jet-to-jet swing of the totals (which the totals head draws) is not
counted again in every pixel. A pixel drawn with a wider spread than its share has sits,
after the scaling, typically below its expected share (the median of a log-normal lies below its mean, and
the many small pixels of a jet add up to close to their mean): the cores of such jets come
out soft.

The shares of a jet add up to 1; drawn independently, they do not, and their sum S is broad
(between 0.53 and 1.57 at its 10% and 90% quantiles for the quick preset's VAE, mean 1.00: the
pixels are calibrated, only not jointly). Scaling the draws by 1/S biases every pixel: a soft
hit far from the axis, whose share barely moves S, comes out on average E[1/S] > 1/E[S] times
its own (Jensen), about 1.2, and the core, whose large and uncertain shares make S, loses what
they gain (ECAL beyond 20 pixels held 46-49% of the channel against the real 40%; the jets'
girth and mass came out 13-24% high). So a sampled jet's shares are first conditioned on S = 1,
to first order as for a Gaussian: ``s_i + (v_i / sum_j v_j) (1 - S)`` with v_i the variance of
pixel i's share under its mixture. What is missing or too much goes to the pixels whose share is
uncertain (the core), and the well-determined soft hits keep theirs; the leading pixel's share
of the jet then matches the real one (0.081 vs 0.083 and 0.103 vs 0.104 per class) and the
girth's excess falls to a third. The final scaling to the drawn total changes the shares only
where the update hit :data:`SHARE_FLOOR`.

Hit counts (``counts``). Pixels hit independently given the latent make a jet's number of hits
a sum of Bernoullis: its spread is about that of a Poisson (Tracks: 4.3-4.6 hits where the data
have 6.0-6.8 at a mean of 14-19), and the difference between quark and gluon jets, which the
latent and the condition must carry through thousands of small probabilities, comes out halved.
With the count head the decoder also gives, per channel, a log-normal of 1 + N discretised to
the integers (N + 1 owns [N + 1/2, N + 3/2); 0 hits all below 3/2), one more NLL term
(``<channel>_count``); a sampled jet draws N from it and hits the N pixels with the largest
``logit(p) - logit(u)``, u the pixel's uniform: Pareto order sampling (Rosen 1997). A pixel is
hit independently exactly when ``logit(p) - logit(u) > 0``, so when N is the number of pixels
that pass this is the independent draw itself, and otherwise it hits each pixel with about the
probability p' = sigmoid(logit p + t), the one shift t of all logits for which the p' add up to
N (the conditional-Poisson design of survey sampling, which Pareto sampling approximates to
O(1/N)). So the pixel probabilities say where the hits go and the head how many there are.
(Ranking by logit + Gumbel noise instead, sampling by the odds without replacement, moved the
hits of the quick preset's jets outwards: reconstructions 16-18% heavier and broader.) The
mean image keeps the pixels' own probabilities. A VAE with ``count_conditioned``
(jetfast.models.vae) also gives the decoder the number of hits, the real one in training and the
drawn one (:meth:`SparseObservation.draw_counts`) in sampling, so that its probabilities are
learned for that many hits.

Decoding: :meth:`SparseObservation.sample` draws occupancies, components and intensities
(and totals) from per-jet random streams (:mod:`jetfast.seeding`); :meth:`SparseObservation.mean`
is the expected image ``p * E[x | hit]`` (scaled to the expected totals), smooth and non-zero
everywhere (for studies, not for jets).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jetfast.data.format import CHANNELS, IMAGE_SIZE
from jetfast.data.transforms import PAD_BEFORE
from jetfast.seeding import jet_generators
from jetfast.sim.detector import TOWER, cells_to_towers, towers_to_cells

NUM_CHANNELS = len(CHANNELS)
CHANNEL_NAMES = ("tracks", "ecal", "hcal")
LOG_SCALE_RANGE = (-7.0, 5.0)  # keeps exp(log scale) finite and the density bounded
# Largest log of a drawn pixel value: far above any jet (e^70 GeV), low enough that a channel's
# sum of 125 x 125 such pixels stays finite in float32, so a wild draw cannot become inf or NaN.
MAX_LOG_VALUE = 70.0
TOWERS = IMAGE_SIZE // TOWER
# Conditioning drawn shares on their sum (SparseObservation._shares_adding_to_one) moves a pixel by
# at most down to this fraction of its draw: a hit stays a hit, never zero or negative.
SHARE_FLOOR = 0.05
DECODE_STREAM = 1  # the seeding stream of pixel draws (the sampler's codes use stream 0)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
COUPLED = ((1, 0), (2, 0), (2, 1))  # (coordinate, earlier coordinate) of each coupling, in SparseOutput.couplings' order
TOTALS_BASES = ("channels", "calorimeter")
_EXPECTATION_NODES = 8  # Gauss-Hermite nodes per coordinate for the expected totals of the calorimeter basis


class SparseOutput(NamedTuple):
    """The decoder's output for the sparse observation model."""

    pixels: torch.Tensor  # (B, 3P, 128, 128): per channel the P parameters of params_per_channel
    totals: torch.Tensor | None  # (B, 3, 2): per coordinate of the totals (loc, log scale), standardised; None: no totals
    couplings: torch.Tensor | None = None  # (B, 3): r of the coordinate pairs COUPLED; None: independent
    counts: torch.Tensor | None = None  # (B, 3, 2): per channel (loc, log scale) of the standardised log(1 + hits); None: no count head


def _normal_log_density(u: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log Normal(u; loc, exp(log_scale)^2), in the standardised units of the model."""
    return -log_scale - _HALF_LOG_2PI - 0.5 * ((u - loc) * torch.exp(-log_scale)) ** 2


def params_per_channel(components: int) -> int:
    """Decoder outputs per image channel: the hit logit, then per component a weight logit (none
    for a single component), a loc and a log scale."""
    return 1 + 3 * components if components > 1 else 3


def total_coordinates(totals: torch.Tensor, basis: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel totals (B, 3) in GeV -> the coordinates their Gaussian is over (B, 3) (see the module
    docstring) and which of them exist (B, 3) bool; a missing one is 0."""
    if basis not in TOTALS_BASES:
        raise ValueError(f"totals basis must be one of {TOTALS_BASES}; got {basis!r}")
    lit = totals > 0
    logs = torch.log(torch.where(lit, totals, 1.0))
    if basis == "channels":
        return torch.where(lit, logs, 0.0), lit
    calo = totals[:, 1] + totals[:, 2]
    coords = torch.stack([logs[:, 0], torch.log(torch.where(calo > 0, calo, 1.0)), logs[:, 1] - logs[:, 2]], dim=1)
    observed = torch.stack([lit[:, 0], calo > 0, lit[:, 1] & lit[:, 2]], dim=1)
    return torch.where(observed, coords, 0.0), observed


def log_channel_totals(coords: torch.Tensor, basis: str) -> torch.Tensor:
    """The inverse of :func:`total_coordinates`: coordinates (..., 3) -> log channel totals (..., 3)."""
    if basis == "channels":
        return coords
    log_calo, logit = coords[..., 1], coords[..., 2]
    # log(C * f) and log(C * (1 - f)) with f = sigmoid(logit), without forming f
    return torch.stack([coords[..., 0], log_calo - F.softplus(-logit), log_calo - F.softplus(logit)], dim=-1)


def _log_normal_interval(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Phi(b) - Phi(a)) for a < b, accurate in both tails."""
    upper = a > 0  # both in the upper tail: Phi(b) - Phi(a) = Phi(-a) - Phi(-b)
    low, high = torch.where(upper, -b, a), torch.where(upper, -a, b)
    log_high, log_low = torch.special.log_ndtr(high), torch.special.log_ndtr(low)
    return log_high + torch.log1p(-torch.exp(log_low - log_high).clamp_max(1.0 - 1e-7))


def hit_statistics(images, *, totals_basis: str = "channels", pixel_shares: bool = False) -> dict:
    """What fixes the units of the model, from training images (N, 125, 125, 3) in GeV: per
    channel (HCAL per tower) the fraction of hit pixels and the mean and std of log(hit value)
    (of log(hit value / channel total) with ``pixel_shares``), of log(1 + hits per jet), and of
    each coordinate of the totals in ``totals_basis``."""
    images = torch.as_tensor(images, dtype=torch.float64)
    stats = {key: [] for key in ("occupancy", "log_mean", "log_std", "total_log_mean", "total_log_std",
                                 "count_log_mean", "count_log_std")}

    def moments(values: torch.Tensor, prefix: str) -> None:
        spread = float(values.std()) if len(values) > 1 else 0.0
        stats[f"{prefix}log_mean"].append(float(values.mean()) if len(values) else 0.0)
        stats[f"{prefix}log_std"].append(spread if spread > 0 else 1.0)

    sums = []
    for values in SparseObservation.targets(images):
        hit = values > 0
        stats["occupancy"].append(float(hit.sum() / max(values.numel(), 1)))
        total = values.flatten(1).sum(1)
        logs = torch.log(torch.where(hit, values, 1.0))
        if pixel_shares:
            logs = logs - torch.log(total.clamp_min(1e-300))[:, None, None]
        moments(logs[hit], "")
        moments(torch.log1p(hit.flatten(1).sum(1).double()), "count_")
        sums.append(total)
    coords, observed = total_coordinates(torch.stack(sums, dim=1), totals_basis)
    for c in range(NUM_CHANNELS):
        moments(coords[observed[:, c], c], "total_")
    return stats


def count_shift(logit: torch.Tensor, n: torch.Tensor, iterations: int = 30, tolerance: float = 1e-6) -> torch.Tensor:
    """The shift t (B,) of all logits (B, H, W) of a jet for which sum sigmoid(logit + t) = n (B,):
    the occupancy calibrated to n hits (0 < n < H W; elsewhere t is that of n clamped into range).

    Newton's method on log sum sigmoid(logit + t) - log n, close to linear in t (slope 1 while the
    probabilities are small), without gradients, until every jet's residual is below ``tolerance``
    (it converges quadratically: ~4 steps, where a fixed 30 took a third of a training step); then
    one more step with them, whose gradient is the implicit function's, -sigmoid'(logit_i + t) /
    sum sigmoid', at the solution."""
    size = logit[0].numel()
    target = torch.log(n.double().clamp(0.5, size - 0.5))
    flat = logit.flatten(1)

    def residual(t, x):
        p = torch.sigmoid(x + t[:, None])
        total = p.sum(1)
        return torch.log(total) - target, (p * (1 - p)).sum(1) / total

    with torch.no_grad():
        x = flat.double()
        t = torch.zeros(len(flat), dtype=torch.float64, device=flat.device)
        for _ in range(iterations):
            g, slope = residual(t, x)
            if len(g) == 0 or float(g.abs().max()) < tolerance:
                break
            t = t - (g / slope.clamp_min(1e-12)).clamp(-10.0, 10.0)
    g, slope = residual(t.detach(), flat.double())
    return (t.detach() - g / slope.clamp_min(1e-12)).to(logit.dtype)


class SparseObservation(nn.Module):
    """Bernoulli occupancy x log-normal intensity per pixel (HCAL per tower); see the module docstring."""

    def __init__(self, log_mean=(0.0, 0.0, 0.0), log_std=(1.0, 1.0, 1.0), components: int = 1,
                 total_log_mean=(0.0, 0.0, 0.0), total_log_std=(1.0, 1.0, 1.0), *, totals_basis: str = "channels",
                 pixel_shares: bool = False, count_log_mean=None, count_log_std=None, count_calibrated: bool = False):
        super().__init__()
        if components < 1:
            raise ValueError(f"components must be >= 1; got {components}")
        if totals_basis not in TOTALS_BASES:
            raise ValueError(f"totals_basis must be one of {TOTALS_BASES}; got {totals_basis!r}")
        self.components = components
        self.totals_basis = totals_basis
        self.pixel_shares = pixel_shares
        self.count_calibrated = count_calibrated
        self.params = params_per_channel(components)
        self.register_buffer("log_mean", torch.tensor(log_mean, dtype=torch.float32))
        self.register_buffer("log_std", torch.tensor(log_std, dtype=torch.float32))
        self.register_buffer("total_log_mean", torch.tensor(total_log_mean, dtype=torch.float32))
        self.register_buffer("total_log_std", torch.tensor(total_log_std, dtype=torch.float32))
        if count_log_mean is not None:  # only a model with a count head has them (and its checkpoints)
            self.register_buffer("count_log_mean", torch.tensor(count_log_mean, dtype=torch.float32))
            self.register_buffer("count_log_std", torch.tensor(count_log_std or (1.0,) * 3, dtype=torch.float32))

    def init_output_bias(self, bias: torch.Tensor, occupancy) -> None:
        """Start the decoder at the training data's occupancy, its components spread over the
        typical intensities."""
        k = self.components
        with torch.no_grad():
            bias = bias.view(NUM_CHANNELS, self.params)
            bias.zero_()
            bias[:, 0] = torch.logit(torch.tensor(occupancy, dtype=bias.dtype).clamp(1e-6, 0.5))
            if k > 1:
                bias[:, 1 + k : 1 + 2 * k] = torch.linspace(-1.0, 1.0, k)

    def split(self, out: torch.Tensor, fp32_towers: bool = False) -> list[torch.Tensor]:
        """Decoder pixel output (B, 3P, 128, 128) -> parameters [tracks (B, P, 125, 125), ecal (B, P, 125, 125),
        hcal (B, P, 25, 25)], P = :func:`params_per_channel` along dim 1; with ``fp32_towers`` a bf16
        output's towers are averaged in fp32 (as if the output had been widened first)."""
        end = PAD_BEFORE + IMAGE_SIZE
        # Views only, pixel-major as the channels-last decoder writes them (a channel-major
        # copy of the whole output would cost as much as a convolution), and unbind rather than
        # indexing: its gradient is one concatenation, where each index would fill a zero
        # tensor the size of the output.
        out = out.permute(0, 2, 3, 1)[:, PAD_BEFORE:end, PAD_BEFORE:end]  # undo the 125 -> 128 padding
        channels = out.reshape(out.shape[0], IMAGE_SIZE, IMAGE_SIZE, NUM_CHANNELS, self.params).unbind(3)
        tracks, ecal, hcal = channels
        # The towers' mean over their cells, reduced in the pixel-major layout: avg_pool2d of the
        # channel-major view first copied it, strided, at ~1 ms per jet.
        towers = hcal.reshape(hcal.shape[0], TOWERS, TOWER, TOWERS, TOWER, self.params)
        towers = towers.mean((2, 4), dtype=torch.float32 if fp32_towers else None)
        return [tracks.permute(0, 3, 1, 2), ecal.permute(0, 3, 1, 2), towers.permute(0, 3, 1, 2)]

    @staticmethod
    def targets(images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 125, 125, 3) GeV -> what is modelled: [tracks (B, 125, 125), ecal (B, 125, 125),
        hcal towers (B, 25, 25)]."""
        return [images[..., 0], images[..., 1], cells_to_towers(images[..., 2])]

    def _unpack(self, params: torch.Tensor):
        """(hit logit (B, H, W), log weights, locs, log scales (B, K, H, W)) in fp32."""
        return (params[:, 0].float(), *self._mixture(params[:, 1:]))

    def _mixture(self, intensity: torch.Tensor):
        """The intensity parameters (everything after the hit logit, along dim 1) -> log weights,
        locs and log scales, (B, K, H, W) or, for single pixels, (N, K) each, in fp32."""
        k = self.components
        intensity = intensity.float()
        if k == 1:
            loc, log_scale = intensity[:, 0:1], intensity[:, 1:2]
            log_weight = torch.zeros_like(loc)
        else:
            log_weight = torch.log_softmax(intensity[:, :k], dim=1)
            loc, log_scale = intensity[:, k : 2 * k], intensity[:, 2 * k : 3 * k]
        return log_weight, loc, log_scale.clamp(*LOG_SCALE_RANGE)

    def nll(self, out: SparseOutput, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Negative log-likelihood of ``images`` (B, 125, 125, 3) in GeV under the decoder output
        ``out``: per jet (B,), ``<channel>_hits`` (where the hits are), ``<channel>_energy`` (how
        much they hold) and, with totals, ``<channel>_total`` (the channel's sum)."""
        if self.pixel_shares and out.totals is None:
            raise ValueError("pixel shares are scaled to the channel totals: the decoder output has no totals")
        terms, sums = {}, []
        for c, (name, params, values) in enumerate(zip(CHANNEL_NAMES, self.split(out.pixels), self.targets(images))):
            hit = values > 0
            total = values.flatten(1).sum(1).float()
            logit, intensity = params.split([1, self.params - 1], dim=1)
            logit = logit[:, 0].float()
            n = hit.flatten(1).sum(1)
            if out.counts is not None and self.count_calibrated:
                logit = logit + count_shift(logit, n)[:, None, None]
            hits = F.binary_cross_entropy_with_logits(logit, hit.float(), reduction="none").flatten(1).sum(1)
            if out.counts is not None and self.count_calibrated:
                # Given N = 0 or every pixel, where the hits are is certain.
                hits = torch.where((n > 0) & (n < hit[0].numel()), hits, 0.0)
            terms[f"{name}_hits"] = hits
            if out.counts is not None:
                terms[f"{name}_count"] = -self._count_log_prob(out, c, n)
            # The intensity only where there is a hit: ~1% of the pixels.
            jet, row, col = hit.nonzero(as_tuple=True)
            log_weight, loc, log_scale = self._mixture(intensity[jet, :, row, col])  # (N_hits, K) each
            log_value = torch.log(values[jet, row, col].float())
            if self.pixel_shares:
                log_value = log_value - torch.log(total[jet])
            u = ((log_value - self.log_mean[c]) / self.log_std[c]).unsqueeze(1)
            nll = torch.log(self.log_std[c]) - torch.logsumexp(log_weight + _normal_log_density(u, loc, log_scale), dim=1)
            terms[f"{name}_energy"] = torch.zeros(len(values), device=nll.device).index_add_(0, jet, nll)
            sums.append(total)
        if out.totals is not None:
            for name, term in zip(CHANNEL_NAMES, self._totals_nll(out, torch.stack(sums, dim=1))):
                terms[f"{name}_total"] = term
        return terms

    def _count_edges(self, out: SparseOutput, c: int, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The standardised interval of log(1 + N) that N hits (B,) own: N + 1 in [N + 1/2, N + 3/2),
        0 hits owning everything below 3/2."""
        loc, scale = out.counts[:, c, 0].float(), out.counts[:, c, 1].float().clamp(*LOG_SCALE_RANGE).exp()
        mean, std = self.count_log_mean[c], self.count_log_std[c]
        n = n.float()
        upper = ((torch.log(n + 1.5) - mean) / std - loc) / scale
        lower = torch.where(n > 0, ((torch.log(n + 0.5) - mean) / std - loc) / scale, -math.inf)
        return lower, upper

    def _count_log_prob(self, out: SparseOutput, c: int, n: torch.Tensor) -> torch.Tensor:
        """log P(N hits) (B,) of channel c under the count head: a log-normal of N + 1, discretised."""
        return _log_normal_interval(*self._count_edges(out, c, n))

    def _coupling(self, out: SparseOutput, c: int, j: int) -> torch.Tensor | None:
        return None if out.couplings is None else out.couplings[:, COUPLED.index((c, j))].float()

    def _totals_nll(self, out: SparseOutput, totals: torch.Tensor) -> list[torch.Tensor]:
        """Per coordinate of the totals (see the module docstring), -log density of its value (B,)
        given those before it, from the channel totals (B, 3) in GeV; 0 where it does not exist
        (the pixel terms already say a channel is empty)."""
        coords, observed = total_coordinates(totals, self.totals_basis)
        terms, noise = [], []
        for c in range(NUM_CHANNELS):
            loc, log_scale = out.totals[:, c, 0].float(), out.totals[:, c, 1].float().clamp(*LOG_SCALE_RANGE)
            x = (coords[:, c] - self.total_log_mean[c]) / self.total_log_std[c]
            e = (x - loc) * torch.exp(-log_scale)
            for j in range(c):
                if (r := self._coupling(out, c, j)) is not None:
                    e = e - r * noise[j]
            lit = observed[:, c]
            e = torch.where(lit, e, 0.0)
            noise.append(e)
            terms.append(torch.where(lit, torch.log(self.total_log_std[c]) + log_scale + _HALF_LOG_2PI + 0.5 * e**2, 0.0))
        return terms

    def noise(self, seed: int, start: int, count: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per channel, (count, 3, H, W) draws for jets ``start .. start + count - 1``: a uniform for
        the hit, a uniform for the component, a standard normal for the intensity; and (count, 6)
        standard normals, for the channel totals (columns 0-2) and the hit counts (3-5). A jet's
        draws depend only on (seed, its index)."""
        sizes = (IMAGE_SIZE * IMAGE_SIZE, IMAGE_SIZE * IMAGE_SIZE, TOWERS * TOWERS)
        pixels = sum(sizes)
        draws = torch.empty(count, 3, pixels)
        totals = torch.empty(count, 2 * NUM_CHANNELS)
        for row, generator in enumerate(jet_generators(seed, start, count, stream=DECODE_STREAM)):
            torch.rand(2, pixels, generator=generator, out=draws[row, :2])
            torch.randn(pixels, generator=generator, out=draws[row, 2])
            # Each after the ones before: a model without totals or counts draws what it did before.
            torch.randn(NUM_CHANNELS, generator=generator, out=totals[row, :NUM_CHANNELS])
            torch.randn(NUM_CHANNELS, generator=generator, out=totals[row, NUM_CHANNELS:])
        # torch.rand draws exactly 0 once in 2^24: as a hit uniform that is logit(u) = -inf, a Pareto key of
        # +inf, a hit whatever the pixel's probability (~1 jet in 350). Half a step of its grid instead.
        draws[:, 0].clamp_min_(2.0**-25)
        shapes = ((IMAGE_SIZE, IMAGE_SIZE), (IMAGE_SIZE, IMAGE_SIZE), (TOWERS, TOWERS))
        return [part.reshape(count, 3, *shape) for part, shape in zip(draws.split(sizes, dim=2), shapes)], totals

    def sample(self, out: SparseOutput, seed: int, start: int = 0, noise=None) -> torch.Tensor:
        """Draw jets (B, 125, 125, 3) in GeV: jet i of the batch is jet ``start + i`` of ``seed``'s stream
        (``noise``: that stream's :meth:`noise`, when the caller has drawn it already)."""
        channels = []
        pixel_draws, normals = noise if noise is not None else self.noise(seed, start, out.pixels.shape[0])
        normals = normals.to(out.pixels.device)
        log_totals = None if out.totals is None else self._log_totals(out, normals[:, :NUM_CHANNELS])
        for c, (params, draws) in enumerate(zip(self.split(out.pixels, fp32_towers=True), pixel_draws)):
            logit = params[:, 0].float()
            draws = draws.to(out.pixels.device)
            if out.counts is None:
                hit = draws[:, 0] < torch.sigmoid(logit)
            else:
                hit = self._hits_of_count(out, c, logit, draws[:, 0], normals[:, NUM_CHANNELS + c])
            # The intensities of the hits only (~1% of the pixels): the mixture at every pixel took
            # most of a decode's time. Each hit reads its own pixel's draws, so the jets are the same.
            jet, row, col = hit.nonzero(as_tuple=True)
            log_weight, loc, log_scale = self._mixture(params[jet, 1:, row, col])  # (N_hits, K) each
            # The component: the first whose cumulative weight exceeds the uniform.
            below = (torch.cumsum(log_weight.exp(), dim=1) <= draws[jet, 1, row, col][:, None]).sum(1, keepdim=True)
            k = below.clamp_max(self.components - 1)
            chosen_loc, chosen_scale = loc.gather(1, k)[:, 0], log_scale.gather(1, k)[:, 0].exp()
            log_value = (chosen_loc + chosen_scale * draws[jet, 2, row, col]) * self.log_std[c] + self.log_mean[c]
            drawn = torch.exp(log_value.clamp_max(MAX_LOG_VALUE))
            if self.pixel_shares and log_totals is not None:
                drawn = self._shares_adding_to_one(drawn, jet, len(logit), log_weight, loc, log_scale, c)
            values = torch.zeros_like(logit)
            values[jet, row, col] = drawn
            if log_totals is not None:
                values = self._scale_to(values, log_totals[:, c].to(values.device).exp())
            channels.append(values)
        return self._assemble(channels)

    def _shares_adding_to_one(self, shares: torch.Tensor, jet: torch.Tensor, jets: int, log_weight: torch.Tensor,
                              loc: torch.Tensor, log_scale: torch.Tensor, c: int) -> torch.Tensor:
        """Shares (N,) drawn independently for the hits of channel c, hit i in jet ``jet[i]`` of
        ``jets``, each under its mixture (N, K), conditioned to first order on adding up to 1 per jet
        (see the module docstring): ``s_i + (v_i / sum_j v_j) (1 - S)``, S the jet's sum of the draws
        and v_i the variance of hit i's share under its mixture. A hit the update would take below
        :data:`SHARE_FLOOR` of its draw keeps that much (it stays a hit); the caller's scaling to the
        total takes up the rest."""
        # log v = log E[s^2] + log(1 - E[s]^2 / E[s^2]), in logs throughout: a wide pixel's moments overflow float32.
        log_m1 = self._log_moment(log_weight, loc, log_scale, c, 1)
        log_m2 = self._log_moment(log_weight, loc, log_scale, c, 2)
        log_var = log_m2 + torch.log1p(-torch.exp((2 * log_m1 - log_m2).clamp_max(-1e-6)))
        # v_i / sum_j v_j per jet, as a softmax over each jet's hits
        top = torch.full((jets,), -math.inf, device=shares.device).scatter_reduce_(0, jet, log_var, "amax")
        weight = torch.exp(log_var - top[jet])
        weight = weight / torch.zeros(jets, device=shares.device).index_add_(0, jet, weight)[jet]
        residual = 1.0 - torch.zeros(jets, device=shares.device).index_add_(0, jet, shares)
        return torch.maximum(shares + weight * residual[jet], SHARE_FLOOR * shares)

    def _log_moment(self, log_weight: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor, c: int,
                    order: int) -> torch.Tensor:
        """log E[x^order] of channel c's intensity mixture, reduced over the components (dim 1):
        sum_k w_k exp(order * mu_k + order^2 sigma_k^2 / 2) for log-normals of mean mu_k and std sigma_k."""
        sigma = torch.exp(log_scale) * self.log_std[c]
        mu = loc * self.log_std[c] + self.log_mean[c]
        return torch.logsumexp(log_weight + order * mu + 0.5 * order**2 * sigma**2, dim=1)

    def _hits_of_count(self, out: SparseOutput, c: int, logit: torch.Tensor, uniforms: torch.Tensor,
                       normals: torch.Tensor) -> torch.Tensor:
        """Hits (B, H, W) of channel c with the count head: N drawn from it (with ``normals`` (B,)),
        then the N pixels with the largest logit(p) - logit(u) (Pareto order sampling with the pixels'
        ``uniforms``; see the module docstring): a jet's number of hits follows the head (its spread
        and how it depends on the latent and the condition), where they sit the pixels' probabilities."""
        keys = (logit - torch.logit(uniforms)).flatten(1)  # > 0: the independent draw's hits
        n = self.draw_counts(out, normals[:, None], channels=(c,))[:, 0].clamp_max(keys.shape[1])
        # each jet's N largest keys, by index: a top-k of the largest N is O(pixels log N), a sort
        # O(pixels log pixels); a threshold at the N-th key would take N + 1 where two keys tie
        # (float32 uniforms repeat: two among a jet's 2,000 likeliest pixels about one jet in ten)
        top = keys.topk(max(1, int(n.max())), dim=1).indices
        taken = torch.arange(top.shape[1], device=keys.device)[None] < n[:, None]
        return torch.zeros_like(keys, dtype=torch.bool).scatter_(1, top, taken).view_as(logit)

    def draw_counts(self, out: SparseOutput, normals: torch.Tensor | None = None, channels=range(NUM_CHANNELS)) -> torch.Tensor:
        """Hits per jet (B, len(channels)) from the count head: with standard normals ``normals`` (B,
        len(channels)) a draw, without them the median. N + 1 owns [N + 1/2, N + 3/2) of the log-normal."""
        columns = []
        for i, c in enumerate(channels):
            loc, scale = out.counts[:, c, 0].float(), out.counts[:, c, 1].float().clamp(*LOG_SCALE_RANGE).exp()
            e = loc if normals is None else loc + scale * normals[:, i].to(loc.device)
            log_n1 = (e * self.count_log_std[c] + self.count_log_mean[c]).clamp_max(20.0)
            columns.append(torch.floor(log_n1.exp() - 0.5).clamp_min(0).long())
        return torch.stack(columns, dim=1)

    def count_features(self, hits: torch.Tensor) -> torch.Tensor:
        """Hits per jet (B, 3) -> the standardised log(1 + hits) the decoder is given with
        ``count_conditioned``."""
        return (torch.log1p(hits.float()) - self.count_log_mean) / self.count_log_std

    @classmethod
    def hit_numbers(cls, images: torch.Tensor) -> torch.Tensor:
        """(B, 125, 125, 3) GeV -> hits per jet and channel (B, 3) (HCAL: towers), as the count head counts them."""
        return torch.stack([(values > 0).flatten(1).sum(1) for values in cls.targets(images)], dim=1)

    def _log_totals(self, out: SparseOutput, draws: torch.Tensor | None = None) -> torch.Tensor:
        """log of each channel's total in GeV (B, 3): drawn with standard normals ``draws`` (B, 3),
        or, without, the log of its expectation."""
        if draws is None and self.totals_basis != "channels":
            return self._log_expected_totals(out)
        noise = torch.zeros(out.totals.shape[0], NUM_CHANNELS, device=out.totals.device) if draws is None else draws
        coords = self._coordinates(out, noise)
        if draws is None:
            # E[T_c] of a log-normal: exp(m + v / 2) with v = (std * scale)^2 (1 + sum_j r_cj^2), the
            # variance of x_c = loc + scale * (e_c + sum_j r_cj e_j)
            for c in range(NUM_CHANNELS):
                scale = out.totals[:, c, 1].float().clamp(*LOG_SCALE_RANGE).exp()
                couplings = [r for j in range(c) if (r := self._coupling(out, c, j)) is not None]
                variance = (1 + sum(r**2 for r in couplings)) * (scale * self.total_log_std[c]) ** 2
                coords[:, c] = coords[:, c] + 0.5 * variance
        return log_channel_totals(coords, self.totals_basis)

    def _coordinates(self, out: SparseOutput, noise: torch.Tensor) -> torch.Tensor:
        """The totals' coordinates (..., 3), unstandardised, for standard normals ``noise`` (..., 3)
        (the leading dimensions of ``noise`` start with the batch's)."""
        columns = []
        shape = (-1,) + (1,) * (noise.ndim - 2)
        for c in range(NUM_CHANNELS):
            loc = out.totals[:, c, 0].float().reshape(shape)
            scale = out.totals[:, c, 1].float().clamp(*LOG_SCALE_RANGE).exp().reshape(shape)
            e = noise[..., c] + sum(r.reshape(shape) * noise[..., j] for j in range(c)
                                    if (r := self._coupling(out, c, j)) is not None)
            columns.append((loc + scale * e) * self.total_log_std[c] + self.total_log_mean[c])
        return torch.stack(columns, dim=-1)

    def _log_expected_totals(self, out: SparseOutput) -> torch.Tensor:
        """log E[T_c] (B, 3) when T_c is not log-normal (the calorimeter basis), by a product
        Gauss-Hermite rule over the three standard normals: exact for the log-normal tracks,
        and for the calorimeter channels to far below the draws' spread."""
        nodes, weights = np.polynomial.hermite_e.hermegauss(_EXPECTATION_NODES)
        grid = torch.tensor(np.stack(np.meshgrid(nodes, nodes, nodes, indexing="ij"), -1).reshape(-1, 3),
                            dtype=torch.float32, device=out.totals.device)
        log_w = torch.tensor(np.log(np.einsum("i,j,k->ijk", weights, weights, weights).ravel() / (2 * math.pi) ** 1.5),
                             dtype=torch.float32, device=out.totals.device)
        noise = grid.expand(out.totals.shape[0], -1, -1)  # (B, nodes^3, 3)
        log_totals = log_channel_totals(self._coordinates(out, noise), self.totals_basis)
        return torch.logsumexp(log_totals + log_w[None, :, None], dim=1)

    @staticmethod
    def _scale_to(values: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """``values`` (B, H, W) scaled so that each jet's sum is ``total`` (B,); empty jets stay empty."""
        current = values.flatten(1).sum(1)
        factor = torch.where(current > 0, total / current.clamp_min(1e-30), 1.0)
        return values * factor[:, None, None]

    def mean(self, out: SparseOutput) -> torch.Tensor:
        """The expected image (B, 125, 125, 3) in GeV: p * sum_k w_k exp(mu_k + sigma_k^2 / 2) per pixel
        (with totals, scaled to the expected total of each channel)."""
        channels = []
        log_totals = None if out.totals is None else self._log_totals(out)
        for c, params in enumerate(self.split(out.pixels, fp32_towers=True)):
            logit, log_weight, loc, log_scale = self._unpack(params)
            if out.counts is not None and self.count_calibrated:  # the occupancy of the head's median count
                logit = logit + count_shift(logit, self.draw_counts(out, channels=(c,))[:, 0])[:, None, None]
            values = torch.sigmoid(logit) * self._log_moment(log_weight, loc, log_scale, c, 1).exp()
            if log_totals is not None:
                values = self._scale_to(values, log_totals[:, c].exp())
            channels.append(values)
        return self._assemble(channels)

    @staticmethod
    def _assemble(channels: list[torch.Tensor]) -> torch.Tensor:
        tracks, ecal, towers = channels
        return torch.stack([tracks, ecal, towers_to_cells(towers)], dim=-1).contiguous()
