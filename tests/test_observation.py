"""The sparse observation model: its likelihood against a direct NumPy computation, sampled
jets reproducible per jet, HCAL always in towers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import norm

from jetfast.models.observation import SparseObservation, SparseOutput, count_shift, hit_statistics
from jetfast.models.vae import VAE, VAEConfig
from jetfast.errors import InvalidArgument
from jetfast.data.transforms import IntensityTransform
from jetfast.sim.detector import cells_to_towers, towers_to_cells


def _numpy_params(out, k):
    """(B, 3P, 128, 128) -> per channel (logit, log weights (B, K, ...), locs, log scales), HCAL per tower."""
    b = out.shape[0]
    p = 1 + 3 * k if k > 1 else 3
    out = out[:, :, 1:126, 1:126].astype(np.float64).reshape(b, 3, p, 125, 125)
    result = []
    for c in range(3):
        params = out[:, c]
        if c == 2:
            params = params.reshape(b, p, 25, 5, 25, 5).mean(axis=(3, 5))
        if k == 1:
            log_w, loc, log_scale = np.zeros_like(params[:, 1:2]), params[:, 1:2], params[:, 2:3]
        else:
            w = params[:, 1 : 1 + k]
            log_w = w - np.log(np.exp(w).sum(axis=1, keepdims=True))
            loc, log_scale = params[:, 1 + k : 1 + 2 * k], params[:, 1 + 2 * k :]
        result.append((params[:, 0], log_w, loc, np.clip(log_scale, -7, 5)))
    return result


def _numpy_coordinates(sums, basis):
    """Channel totals (B, 3) -> the totals' coordinates and which exist, from the module docstring."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if basis == "channels":
            return np.log(sums), sums > 0
        tracks, ecal, hcal = sums.T
        coords = np.stack([np.log(tracks), np.log(ecal + hcal), np.log(ecal / hcal)], axis=1)
        return coords, np.stack([tracks > 0, ecal + hcal > 0, (ecal > 0) & (hcal > 0)], axis=1)


def _numpy_nll(out, images, log_mean, log_std, k, totals=None, total_log_mean=None, total_log_std=None,
               basis="channels", shares=False):
    """Straight from the formulas, per channel and pixel, in float64."""
    b = out.shape[0]
    result, sums = {}, []
    for c, (name, (logit, log_w, loc, log_scale)) in enumerate(zip(("tracks", "ecal", "hcal"), _numpy_params(out, k))):
        x = images[..., c].astype(np.float64)
        if name == "hcal":
            x = x.reshape(b, 25, 5, 25, 5).sum(axis=(2, 4))
        p = 1 / (1 + np.exp(-logit))
        hit = x > 0
        hits = -np.where(hit, np.log(p), np.log1p(-p))
        sigma = np.exp(log_scale) * log_std[c]
        mean = log_mean[c] + loc * log_std[c]
        total = x.reshape(b, -1).sum(1)
        sums.append(total)
        if shares:  # the intensity of a hit as its share of the channel's total
            x = x / np.where(total > 0, total, 1.0)[:, None, None]
        logx = np.log(np.where(hit, x, 1.0))[:, None]
        log_density = logsumexp(log_w + norm.logpdf(logx, mean, sigma), axis=1)
        result[f"{name}_hits"] = hits.reshape(b, -1).sum(1)
        result[f"{name}_energy"] = -np.where(hit, log_density, 0.0).reshape(b, -1).sum(1)
    if totals is not None:
        # each coordinate v ~ Normal(mean + loc * std, (exp(log scale) * std)^2); the density of v
        coords, observed = _numpy_coordinates(np.stack(sums, axis=1), basis)
        for c, name in enumerate(("tracks", "ecal", "hcal")):
            loc, scale = totals[:, c, 0], np.exp(np.clip(totals[:, c, 1], -7, 5)) * total_log_std[c]
            density = norm.logpdf(np.where(observed[:, c], coords[:, c], 0.0), total_log_mean[c] + loc * total_log_std[c], scale)
            result[f"{name}_total"] = -np.where(observed[:, c], density, 0.0)
    return result


def _sparse_images(rng, b):
    images = np.zeros((b, 125, 125, 3), np.float32)
    for c, hits in enumerate((20, 100, 12)):
        for j in range(b):
            rows, cols = rng.integers(0, 125, hits), rng.integers(0, 125, hits)
            images[j, rows, cols, c] = np.exp(rng.normal(0, 1.5, hits))
    # HCAL as the detector stores it: towers spread over their 25 cells
    towers = images[..., 2].reshape(b, 25, 5, 25, 5).sum(axis=(2, 4))
    images[..., 2] = np.repeat(np.repeat(towers / 25, 5, axis=1), 5, axis=2)
    return images


@pytest.mark.parametrize("b, k, with_totals, basis, shares", [
    (1, 1, False, "channels", False), (3, 1, True, "channels", False), (2, 3, False, "channels", False),
    (4, 3, True, "channels", False), (5, 3, True, "calorimeter", False), (4, 1, True, "calorimeter", True),
    (3, 3, True, "channels", True)])
def test_nll_matches_numpy(b, k, with_totals, basis, shares, rng):
    model = SparseObservation(tuple(rng.normal(0, 1, 3)), tuple(rng.uniform(0.5, 2, 3)), components=k,
                              total_log_mean=tuple(rng.normal(3, 1, 3)), total_log_std=tuple(rng.uniform(0.3, 1, 3)),
                              totals_basis=basis, pixel_shares=shares)
    out = rng.normal(0, 1, (b, 3 * model.params, 128, 128)).astype(np.float32)
    totals = rng.normal(0, 1, (b, 3, 2)).astype(np.float32) if with_totals else None
    images = _sparse_images(rng, b)
    if with_totals:
        images[0, ..., 1] = 0  # an empty channel has no total term (in the calorimeter basis: no fraction)
    if b > 4:
        images[4, ..., 1:] = 0  # nor, for the calorimeter, an empty calorimeter
    got = model.nll(SparseOutput(torch.from_numpy(out), None if totals is None else torch.from_numpy(totals)),
                    torch.from_numpy(images))
    want = _numpy_nll(out, images, model.log_mean.double().numpy(), model.log_std.double().numpy(), k, totals,
                      model.total_log_mean.double().numpy(), model.total_log_std.double().numpy(), basis, shares)
    assert set(got) == set(want)
    for k in want:
        # float32 sums of O(1)..O(1e4) terms: relative to the value, and absolute where a
        # per-jet term of O(10) cancels to nearly zero
        np.testing.assert_allclose(got[k].double().numpy(), want[k], rtol=2e-5, atol=1e-5, err_msg=k)


def test_towers_are_the_detector_layout(rng):
    towers = rng.exponential(1.0, (2, 25, 25))
    cells = towers_to_cells(towers)
    np.testing.assert_array_equal(cells, np.repeat(np.repeat(towers / 25, 5, axis=1), 5, axis=2))
    np.testing.assert_allclose(cells_to_towers(cells), towers, rtol=1e-12)
    as_torch = towers_to_cells(torch.from_numpy(towers))
    np.testing.assert_array_equal(as_torch.numpy(), cells)
    torch.testing.assert_close(cells_to_towers(as_torch), torch.from_numpy(towers))


def _observation_and_output(rng, b, k=1, totals=False):
    model = SparseObservation((0.5, -2.0, 1.0), (1.0, 0.8, 1.2), components=k, total_log_mean=(4.0, 3.5, 4.2),
                              total_log_std=(0.5, 0.7, 0.4))
    out = torch.from_numpy(rng.normal(0, 1, (b, 3 * model.params, 128, 128)).astype(np.float32))
    out[:, 0 :: model.params] -= 4.0  # hit logits: a few percent of the pixels
    return model, SparseOutput(out, torch.from_numpy(rng.normal(0, 0.5, (b, 3, 2)).astype(np.float32)) if totals else None)


def _rows(out: SparseOutput, rows: slice) -> SparseOutput:
    return SparseOutput(out.pixels[rows], None if out.totals is None else out.totals[rows])


def _tower_constant(hcal):
    blocks = hcal.reshape(hcal.shape[0], 25, 5, 25, 5)
    return torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))


@pytest.mark.parametrize("k, totals", [(1, False), (3, False), (3, True)])
def test_sampled_jets_depend_on_seed_and_index_only(k, totals, rng, seed):
    model, out = _observation_and_output(rng, 5, k, totals)
    batch = model.sample(out, seed=seed, start=10)
    assert batch.shape == (5, 125, 125, 3) and batch.dtype == torch.float32
    assert torch.isfinite(batch).all() and (batch >= 0).all()
    # Jet 12 decoded alone, or in another batch, is the same jet.
    torch.testing.assert_close(model.sample(_rows(out, slice(2, 3)), seed=seed, start=12), batch[2:3], rtol=0, atol=0)
    torch.testing.assert_close(model.sample(_rows(out, slice(1, 4)), seed=seed, start=11), batch[1:4], rtol=0, atol=0)
    assert not torch.equal(model.sample(out, seed=seed + 1, start=10), batch)
    # Sparse: only hit pixels are non-zero, HCAL constant on every tower.
    occupancy = (batch > 0).double().mean(dim=(0, 1, 2))
    assert 0 < occupancy[0] < 0.2 and 0 < occupancy[1] < 0.2
    assert _tower_constant(batch[..., 2])


@pytest.mark.parametrize("k", [1, 3])
def test_sampled_jets_are_each_pixels_own_draws(k, rng, seed):
    """Every pixel against a direct float64 computation from its jet's stream: hit if its uniform is
    below p, the first component whose cumulative weight exceeds the second uniform, the log-normal
    of that component at the normal; HCAL per tower, spread over its cells."""
    from jetfast.models.observation import MAX_LOG_VALUE

    model, out = _observation_and_output(rng, 3, k)
    jets = model.sample(out, seed=seed, start=4).double().numpy()
    draws, _ = model.noise(seed, 4, 3)
    for c, ((logit, log_w, loc, log_scale), noise) in enumerate(zip(_numpy_params(out.pixels.numpy(), k), draws)):
        u_hit, u_component, normal = noise.double().numpy().transpose(1, 0, 2, 3)
        p = 1 / (1 + np.exp(-logit))
        hit = u_hit < p
        # The jets' float32 hit probability is a few ulps off this one: a uniform that close to it
        # may fall on either side (seen: u 0.02479672432 against p 0.02479672457).
        tie = np.abs(u_hit - p) <= 8 * np.finfo(np.float32).eps * p
        component = np.minimum((np.cumsum(np.exp(log_w), axis=1) <= u_component[:, None]).sum(1), k - 1)[:, None]
        chosen = [np.take_along_axis(t, component, axis=1)[:, 0] for t in (loc, log_scale)]
        log_value = (chosen[0] + np.exp(chosen[1]) * normal) * float(model.log_std[c]) + float(model.log_mean[c])
        value = np.exp(np.minimum(log_value, MAX_LOG_VALUE))
        want = np.where(hit, value, 0.0)
        if c == 2:
            want, value, tie = towers_to_cells(want), towers_to_cells(value), towers_to_cells(tie.astype(float)) > 0
        got = jets[..., c]
        assert tie.mean() < 1e-3
        # A hit drawn far down the log-normal (1e-54 GeV) is 0 in float32: compare in the jets' precision.
        assert ((got > 0) == (want.astype(np.float32) > 0))[~tie].all()
        np.testing.assert_allclose(got[~tie], want[~tie], rtol=2e-5, atol=1e-30)
        # a tie is either no hit or the hit's own draw
        assert ((got[tie] == 0) | np.isclose(got[tie], value[tie], rtol=2e-5, atol=1e-30)).all()
    # A bf16 decoder output is read as its values widened: the same jets.
    low = out.pixels.bfloat16()
    torch.testing.assert_close(model.sample(SparseOutput(low, None), seed=seed, start=4),
                               model.sample(SparseOutput(low.float(), None), seed=seed, start=4), rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 3])
def test_sampled_occupancy_and_intensity_follow_the_model(k, rng, seed):
    """Draws agree with the probabilities and the mixture they come from: the hit rate, and the
    probability integral transform of every drawn log-intensity is uniform."""
    from scipy.stats import kstest

    model, out = _observation_and_output(rng, 8, k)
    logit, log_w, loc, log_scale = _numpy_params(out.pixels.numpy(), k)[0]
    p = 1 / (1 + np.exp(-logit))
    jets = model.sample(out, seed=seed)[..., 0].double().numpy()
    hits = jets > 0
    assert abs(hits.mean() - p.mean()) < 5 * math.sqrt(p.mean() / p.size)
    u = ((np.log(jets[hits]) - float(model.log_mean[0])) / float(model.log_std[0]))[:, None]
    w = np.exp(log_w).transpose(0, 2, 3, 1)[hits]  # (hits, K)
    cdf = (w * norm.cdf((u - loc.transpose(0, 2, 3, 1)[hits]) / np.exp(log_scale.transpose(0, 2, 3, 1)[hits]))).sum(1)
    assert kstest(cdf, "uniform").pvalue > 1e-4


@pytest.mark.parametrize("basis", ["channels", "calorimeter"])
def test_sampled_channels_hold_the_drawn_totals(basis, rng, seed):
    """With totals, a sampled jet's channel sums are its drawn totals: coordinates
    v = (loc + scale * eps) * std + mean with the jet's own normals, which are the log totals
    or (log Tracks, log calorimeter sum, logit of its ECAL fraction); where the energy sits is
    the pixels' (the same hits as without totals), and HCAL keeps its towers."""
    model, out = _observation_and_output(rng, 6, 3, totals=True)
    model.totals_basis = basis
    jets = model.sample(out, seed=seed).double()
    eps = model.noise(seed, 0, 6)[1][:, :3]
    loc, scale = out.totals[..., 0].double(), out.totals[..., 1].double().exp()
    v = ((loc + scale * eps.double()) * model.total_log_std.double() + model.total_log_mean.double()).numpy()
    if basis == "channels":
        want = np.exp(v)
    else:
        ecal_fraction = 1 / (1 + np.exp(-v[:, 2]))
        want = np.stack([np.exp(v[:, 0]), np.exp(v[:, 1]) * ecal_fraction, np.exp(v[:, 1]) * (1 - ecal_fraction)], axis=1)
    torch.testing.assert_close(jets.sum(dim=(1, 2)), torch.from_numpy(want), rtol=1e-5, atol=0)
    plain = model.sample(SparseOutput(out.pixels, None), seed=seed).double()
    # The same hits, but for those with a share of the channel so small that scaling takes them
    # below the smallest float32 (random test parameters draw such values; jets do not).
    share = plain / plain.sum(dim=(1, 2), keepdim=True)
    assert not ((jets > 0) & (plain == 0)).any() and (share[(plain > 0) & (jets == 0)] < 1e-25).all()
    assert _tower_constant(jets[..., 2].float())
    # Within a channel the shares are the pixels': one factor per jet and channel.
    ratio = torch.where(share > 1e-25, jets / plain.clamp_min(1e-300), float("nan"))  # float32 subnormals aside
    for j in range(6):
        for c in range(3):
            values = ratio[j, ..., c][~torch.isnan(ratio[j, ..., c])]
            torch.testing.assert_close(values, values[:1].expand_as(values), rtol=1e-5, atol=0)


@pytest.mark.parametrize("k", [1, 3])
def test_mean_image_matches_numpy(k, rng):
    model, out = _observation_and_output(rng, 2, k)
    out.pixels[:, :] *= 0.3  # moderate widths: exp(sigma^2 / 2) stays within float32
    mean = model.mean(out).double().numpy()
    for c, (logit, log_w, loc, log_scale) in enumerate(_numpy_params(out.pixels.numpy(), k)):
        sigma = np.exp(log_scale) * float(model.log_std[c])
        expected = (np.exp(log_w + loc * float(model.log_std[c]) + float(model.log_mean[c]) + sigma**2 / 2)).sum(1)
        want = expected / (1 + np.exp(-logit))
        if c == 2:
            want = np.repeat(np.repeat(want / 25, 5, axis=1), 5, axis=2)
        np.testing.assert_allclose(mean[..., c], want, rtol=1e-5)
    # With totals the expected image is scaled to each channel's expected total, E[T] = exp(m + s^2 / 2).
    _, with_totals = _observation_and_output(rng, 2, k, totals=True)
    sums = model.mean(SparseOutput(out.pixels, with_totals.totals)).double().sum(dim=(1, 2))
    std, scale = model.total_log_std.double(), with_totals.totals[..., 1].double().exp()
    want = torch.exp(model.total_log_mean.double() + with_totals.totals[..., 0].double() * std + (scale * std) ** 2 / 2)
    torch.testing.assert_close(sums, want, rtol=1e-5, atol=0)


def test_hit_statistics(rng):
    images = _sparse_images(rng, 4)
    stats = hit_statistics(images)
    tracks = images[..., 0][images[..., 0] > 0].astype(np.float64)
    assert stats["occupancy"][0] == pytest.approx(len(tracks) / (4 * 125 * 125))
    assert stats["log_mean"][0] == pytest.approx(np.log(tracks).mean())
    towers = images[..., 2].reshape(4, 25, 5, 25, 5).sum(axis=(2, 4))
    assert stats["occupancy"][2] == pytest.approx((towers > 0).mean())
    totals = np.log(images.astype(np.float64).sum(axis=(1, 2)))  # (4, 3)
    assert stats["total_log_mean"] == pytest.approx(totals.mean(0).tolist())
    assert stats["total_log_std"] == pytest.approx(totals.std(0, ddof=1).tolist())


def test_hit_statistics_of_shares_and_calorimeter_coordinates(rng):
    images = _sparse_images(rng, 5)
    images[3, ..., 2] = 0  # no HCAL: no ECAL fraction, but a calorimeter sum
    stats = hit_statistics(images, totals_basis="calorimeter", pixel_shares=True)
    ecal = images[..., 1].astype(np.float64)
    shares = (ecal / ecal.sum(axis=(1, 2), keepdims=True))[ecal > 0]
    assert stats["log_mean"][1] == pytest.approx(np.log(shares).mean())
    assert stats["log_std"][1] == pytest.approx(np.log(shares).std(ddof=1))
    sums = images.astype(np.float64).sum(axis=(1, 2))
    calo = np.log(sums[:, 1] + sums[:, 2])
    fraction = np.log(sums[[0, 1, 2, 4], 1] / sums[[0, 1, 2, 4], 2])
    assert stats["total_log_mean"] == pytest.approx([np.log(sums[:, 0]).mean(), calo.mean(), fraction.mean()])
    assert stats["total_log_std"] == pytest.approx([np.log(sums[:, 0]).std(ddof=1), calo.std(ddof=1), fraction.std(ddof=1)])


def test_pixel_shares_need_totals(rng):
    model, out = _observation_and_output(rng, 2, 1)
    model.pixel_shares = True
    with pytest.raises(ValueError, match="totals"):
        model.nll(out, torch.from_numpy(_sparse_images(rng, 2)))
    with pytest.raises(ValueError, match="pixel_shares"):
        VAEConfig(channel_totals=False, pixel_shares=True)
    with pytest.raises(ValueError, match="totals_basis"):
        VAEConfig(channel_totals=True, totals_basis="towers")


def _small_vae_config(images):
    """An intensity transform and a small sparse VAE config with channel totals, fitted to ``images``."""
    hits = hit_statistics(images)
    config = VAEConfig(latent_dim=8, widths=(4, 8, 8, 8), hit_occupancy=hits["occupancy"],
                       hit_log_mean=hits["log_mean"], hit_log_std=hits["log_std"], channel_totals=True,
                       total_log_mean=hits["total_log_mean"], total_log_std=hits["total_log_std"])
    return IntensityTransform.fit(images.numpy()), config


def test_vae_decodes_sparse_jets_in_towers(rng, seed):
    images = torch.from_numpy(_sparse_images(rng, 3))
    transform, config = _small_vae_config(images)
    vae = VAE(config).eval()
    z = torch.randn(3, 8)
    jets = vae.images(z, transform, mode="sample", seed=seed)
    assert jets.shape == (3, 125, 125, 3) and _tower_constant(jets[..., 2])
    # At initialisation the decoder starts at the data's occupancy.
    occupancy = (jets > 0).double().mean(dim=(0, 1, 2))
    assert occupancy[0] == pytest.approx(config.hit_occupancy[0], rel=0.5, abs=1e-3)
    assert torch.equal(vae.images(z, transform, seed=seed), jets)
    mean = vae.images(z, transform, mode="mean")
    assert (mean > 0).all() and _tower_constant(mean[..., 2])
    with pytest.raises(ValueError, match="mode"):
        vae.images(z, transform, mode="median")
    x = transform.to_model(images)
    terms = vae.loss(x, *vae(x), images=images)
    expected = {"loss", "recon", "kl",
                *(f"{c}_{t}" for c in ("tracks", "ecal", "hcal") for t in ("hits", "energy", "total"))}
    assert set(terms) == expected and all(torch.isfinite(v) for v in terms.values())
    with pytest.raises(ValueError, match="images"):
        vae.loss(x, *vae(x))


def test_bf16_decoding_is_fp32_decoding_within_bf16_error(rng, seed):
    """The decoder under bf16 autocast: its outputs differ from fp32 by about what rounding the
    weights and the latents to bf16 alone does, not more; the draws stay jets in towers."""
    images = torch.from_numpy(_sparse_images(rng, 4))
    transform, config = _small_vae_config(images)
    vae = VAE(config).eval()
    z = torch.randn(5, 8)
    with torch.inference_mode():
        want = vae.decode(z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = vae.decode(z)
        rounded = VAE(config).eval()  # the same model with its weights rounded to bf16, run in fp32
        rounded.load_state_dict({k: v.bfloat16().float() if v.is_floating_point() else v for k, v in vae.state_dict().items()})
        reference = rounded.decode(z.bfloat16().float())
        for name in ("pixels", "totals"):
            error = (getattr(got, name).float() - getattr(want, name)).abs().max()
            floor = (getattr(reference, name) - getattr(want, name)).abs().max()
            assert error <= 8 * floor + 1e-3, (name, float(error), float(floor))
        jets = vae.images(z, transform, mode="sample", seed=seed, precision="bf16")
        assert jets.dtype == torch.float32 and torch.isfinite(jets).all() and _tower_constant(jets[..., 2])
        assert torch.equal(vae.images(z, transform, seed=seed, precision="bf16"), jets)
        with pytest.raises(ValueError, match="precision"):
            vae.images(z, transform, precision="fp16")


@pytest.mark.parametrize("basis", ["channels", "calorimeter"])
def test_correlated_totals_are_a_full_covariance_normal(basis, rng, seed):
    """With couplings, the standardised coordinates of the totals are N(loc, S) with
    S = D (I + R)(I + R)^T D: the density against SciPy's multivariate normal, the draws'
    covariance against S, and the expected totals against the draws' mean."""
    from scipy.stats import multivariate_normal

    from jetfast.models.observation import COUPLED

    b = 5
    model = SparseObservation((0.0,) * 3, (1.0,) * 3, components=1, total_log_mean=tuple(rng.normal(3, 1, 3)),
                              total_log_std=tuple(rng.uniform(0.3, 1, 3)), totals_basis=basis)
    totals = rng.normal(0, 0.5, (b, 3, 2))
    couplings = rng.normal(0, 0.8, (b, 3))
    # The draws below use jet 0: log widths of at most ~1.2, whose log-normal tail a mean of
    # 20,000 draws can average (wider ones, up to 4.5, once put the mean 5 errors off).
    totals[0, :, 1] = np.minimum(totals[0, :, 1], 0.0)
    couplings[0] = np.clip(couplings[0], -0.5, 0.5)
    sums = np.exp(rng.normal(3, 1, (b, 3)))
    out = SparseOutput(torch.zeros(b, 3 * model.params, 128, 128), torch.from_numpy(totals).float(),
                       torch.from_numpy(couplings).float())
    got = torch.stack(model._totals_nll(out, torch.from_numpy(sums).float()), dim=1).sum(1).double().numpy()
    mean, std = model.total_log_mean.double().numpy(), model.total_log_std.double().numpy()
    coords = _numpy_coordinates(sums, basis)[0]

    def covariance(i):
        lower = np.eye(3)
        for (c, j), r in zip(COUPLED, couplings[i]):
            lower[c, j] = r
        scale = np.diag(np.exp(totals[i, :, 1]) * std) @ lower  # of the coordinates in their own units
        return scale @ scale.T

    for i in range(b):
        want = -multivariate_normal(mean + totals[i, :, 0] * std, covariance(i)).logpdf(coords[i])
        assert got[i] == pytest.approx(want, rel=1e-5, abs=1e-5), i
    # Draws: many jets of one set of parameters, their coordinates' covariance is S.
    n = 20000
    one = SparseOutput(torch.zeros(1), torch.from_numpy(np.repeat(totals[:1], n, 0)).float(),
                       torch.from_numpy(np.repeat(couplings[:1], n, 0)).float())
    draws = torch.from_numpy(np.random.default_rng(seed).normal(size=(n, 3))).float()
    log_totals = model._log_totals(one, draws).double().numpy()
    drawn = _numpy_coordinates(np.exp(log_totals), basis)[0]
    s = covariance(0)
    np.testing.assert_allclose(np.cov(drawn.T), s, rtol=0.1, atol=0.02 * np.abs(s).max())
    # The expected totals: E[T_c], in the channel basis exp(m_c + S_cc / 2), in both the draws' mean.
    expected = model._log_totals(SparseOutput(one.pixels, one.totals[:1], one.couplings[:1])).double().numpy()[0]
    if basis == "channels":
        np.testing.assert_allclose(expected, mean + totals[0, :, 0] * std + np.diag(s) / 2, rtol=1e-5)
    error = np.exp(log_totals).std(0) / np.sqrt(n)  # of the draws' mean
    assert (np.abs(np.exp(expected) - np.exp(log_totals).mean(0)) < 4 * error).all()


@pytest.mark.parametrize("basis, shares, counts", [("channels", False, False), ("calorimeter", True, False),
                                                   ("calorimeter", True, True)])
def test_vae_with_correlated_totals_decodes_and_scores(basis, shares, counts, rng, seed):
    images = torch.from_numpy(_sparse_images(rng, 3))
    transform, config = _small_vae_config(images)
    config.total_correlations, config.totals_basis, config.pixel_shares = True, basis, shares
    config.hit_counts = counts
    vae = VAE(config).eval()
    z = torch.randn(3, 8)
    out = vae.decode(z)
    assert out.totals.shape == (3, 3, 2) and out.couplings.shape == (3, 3)
    jets = vae.images(z, transform, seed=seed)
    assert torch.equal(vae.images(z, transform, seed=seed), jets) and _tower_constant(jets[..., 2])
    terms = vae.loss(transform.to_model(images), *vae(transform.to_model(images)), images=images)
    assert all(torch.isfinite(v) for v in terms.values()) and "hcal_total" in terms
    assert ("tracks_count" in terms) == counts and (out.counts is not None) == counts
    # The state holds the count statistics exactly when the model has the head, so checkpoints
    # written before the head existed load into a model without it, and the two kinds round-trip.
    assert ("observation.count_log_mean" in vae.state_dict()) == counts
    VAE(config).load_state_dict(vae.state_dict())


def test_count_conditioned_decoder_places_hits_for_the_drawn_count(rng, seed):
    """With ``count_conditioned`` the decoder is given the hits per channel: other counts move the
    pixels but not the sums' heads; a sampled jet has exactly the hits drawn from the count head
    with its own stream's normals (decoding it again alone gives it back);
    the mean image decodes for the head's median; bad counts are refused."""
    images = torch.from_numpy(_sparse_images(rng, 4))
    transform, config = _small_vae_config(images)
    stats = hit_statistics(images, totals_basis="calorimeter", pixel_shares=True)
    config.total_correlations, config.totals_basis, config.pixel_shares = True, "calorimeter", True
    config.hit_counts = config.count_conditioned = config.count_calibrated = True
    config.count_log_mean, config.count_log_std = tuple(stats["count_log_mean"]), tuple(stats["count_log_std"])
    vae = VAE(config).eval()
    with torch.no_grad():  # spread the decoder's counts and odds so that the test has something to see
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    z = torch.randn(4, 8)
    few, many = torch.full((4, 3), 3), torch.full((4, 3), 300)
    a, b = vae.decode(z, hits=few), vae.decode(z, hits=many)
    assert not torch.equal(a.pixels, b.pixels) and torch.equal(a.totals, b.totals) and torch.equal(a.counts, b.counts)
    assert torch.equal(vae.decode(z).pixels, vae.decode(z, hits=vae.observation.draw_counts(a)).pixels)

    jets = vae.images(z, transform, seed=seed, start=5)
    _, normals = vae.observation.noise(seed, 5, 4)
    drawn = vae.observation.draw_counts(a, normals[:, 3:])
    limits = torch.tensor([125 * 125, 125 * 125, 25 * 25])
    assert torch.equal(SparseObservation.hit_numbers(jets), torch.minimum(drawn, limits))
    alone = vae.images(z[2:3], transform, seed=seed, start=7)
    # The same hits; the GEMMs round by batch size, and an intensity's exponent and share carry
    # that rounding on: up to 2e-5 relative over 150 seeds.
    assert torch.equal(alone > 0, jets[2:3] > 0) and torch.allclose(alone, jets[2:3], rtol=1e-4, atol=1e-6)
    assert _tower_constant(jets[..., 2]) and torch.isfinite(vae.images(z, transform, mode="mean")).all()

    x = transform.to_model(images)
    out, _, _ = vae(x, None, SparseObservation.hit_numbers(images))
    terms = vae.loss(x, out, torch.zeros(4, 8), torch.zeros(4, 8), images=images)
    assert all(torch.isfinite(v) for v in terms.values()) and "ecal_count" in terms
    with pytest.raises(ValueError, match="hits of shape"):
        vae.decode(z, hits=torch.zeros(4, 2))
    with pytest.raises(InvalidArgument, match="count_conditioned needs hit_counts"):
        VAEConfig(channel_totals=True, count_conditioned=True)


def test_count_head_is_a_discretised_log_normal(rng, seed):
    """log P(N hits) against SciPy: N + 1 owns [N + 1/2, N + 3/2) of a log-normal, 0 hits everything
    below 3/2; the probabilities of all counts add up to one (less the tail beyond those summed);
    and a sampled jet has exactly the number of hits that the same normal gives through the
    inverse, in every channel."""
    b = 4
    model = SparseObservation((0.0,) * 3, (1.0,) * 3, components=1, count_log_mean=(2.8, 4.7, 3.4),
                              count_log_std=(0.4, 0.15, 0.3))
    pixels = torch.from_numpy(rng.normal(0, 1, (b, 3 * model.params, 128, 128)).astype(np.float32))
    pixels[:, 0 :: model.params] -= 4.0
    counts = torch.from_numpy(rng.normal(0, 0.6, (b, 3, 2)).astype(np.float32))
    out = SparseOutput(pixels, None, None, counts)
    mean, std = model.count_log_mean.double().numpy(), model.count_log_std.double().numpy()
    for c in range(3):
        loc = mean[c] + counts[:, c, 0].double().numpy() * std[c]
        sigma = np.exp(counts[:, c, 1].double().numpy()) * std[c]
        n = torch.tensor([0, 1, 17, 400])
        got = model._count_log_prob(out, c, n).double().numpy()
        b_ = (np.log(n.numpy() + 1.5) - loc) / sigma
        a_ = np.where(n.numpy() > 0, (np.log(n.numpy() + 0.5) - loc) / sigma, -np.inf)
        # in double, each tail from its own side
        with np.errstate(divide="ignore"):
            want = np.log(np.where(a_ > 0, norm.sf(a_) - norm.sf(b_), norm.cdf(b_) - norm.cdf(a_)))
        finite = np.isfinite(want)  # beyond double's range the reference underflows; ours stays finite
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-4, atol=1e-5)
        assert np.isfinite(got).all() and (got[~finite] < -700).all()
        every = torch.arange(0, 20000)
        total = torch.stack([model._count_log_prob(SparseOutput(pixels[i:i + 1].expand(1, -1, -1, -1), None, None,
                                                                counts[i:i + 1]), c, every).exp().sum() for i in range(b)])
        # all of the probability, but what a wide log-normal puts beyond the last count summed
        np.testing.assert_allclose(total.double().numpy(), norm.cdf((np.log(len(every) + 0.5) - loc) / sigma), atol=1e-3)
    jets = model.sample(out, seed=seed)
    normals = model.noise(seed, 0, b)[1][:, 3:].double()
    want = np.floor(np.exp((counts[..., 0].double() + counts[..., 1].double().exp() * normals).numpy() * std + mean) - 0.5)
    got = np.stack([(jets[..., 0] > 0).sum((1, 2)).numpy(), (jets[..., 1] > 0).sum((1, 2)).numpy(),
                    (cells_to_towers(jets[..., 2]) > 0).sum((1, 2)).numpy()], axis=1)
    np.testing.assert_array_equal(got, np.clip(want, 0, None))
    assert torch.equal(model.sample(out, seed=seed), jets)


def test_count_shift_calibrates_the_occupancy_to_the_count(rng):
    """count_shift: sum sigmoid(logit + t) = n for logits spread over 30 units and counts from 1 to
    all but one pixel; its gradient is the implicit function's (checked against float64 finite
    differences of the solution)."""
    logit = torch.from_numpy(rng.normal(-6, 5, (5, 7, 9))).float()
    n = torch.tensor([1, 4, 20, 62, 31])
    t = count_shift(logit, n)
    np.testing.assert_allclose(torch.sigmoid(logit + t[:, None, None]).double().sum((1, 2)).numpy(), n.numpy(), rtol=1e-4)
    x = logit.double().requires_grad_()
    shift = count_shift(x, n)
    (grad,) = torch.autograd.grad(shift[2], x)
    p = torch.sigmoid(x.detach()[2] + shift.detach()[2])
    np.testing.assert_allclose(grad[2].numpy(), (-p * (1 - p) / (p * (1 - p)).sum()).numpy(), rtol=1e-6, atol=1e-12)
    assert (grad[[0, 1, 3, 4]] == 0).all()  # one jet's shift depends on its own logits only
    bumped = x.detach().clone()
    bumped[2, 3, 4] += 1e-4
    numeric = (count_shift(bumped, n)[2] - shift.detach()[2]) / 1e-4
    assert float(numeric) == pytest.approx(float(grad[2, 3, 4]), rel=1e-3)


def test_counted_hits_keep_the_pixels_probabilities(seed):
    """N hits drawn for pixels whose probabilities add up to N hit each pixel with about its own
    probability (Pareto order sampling): 10 core pixels at p = 0.5 and 2,000 at p = 0.0025 share
    10 hits about evenly, as independent draws would (ranking by the odds with Gumbel noise gives
    the core 5.8 of them)."""
    model = SparseObservation((0.0,) * 3, (1.0,) * 3, components=1, count_log_mean=(np.log(11.0),) * 3,
                              count_log_std=(1.0,) * 3)
    b = 600
    pixels = torch.full((b, 3 * model.params, 128, 128), -30.0)
    core, rim = (slice(60, 62), slice(60, 65)), (slice(10, 50), slice(10, 60))  # 10 and 2,000 pixels
    pixels[:, 0 :: model.params, core[0], core[1]] = 0.0
    pixels[:, 0 :: model.params, rim[0], rim[1]] = math.log(0.0025 / 0.9975)
    counts = torch.zeros(b, 3, 2)
    counts[..., 1] = -6.0  # N + 1 = 11 every time: 10 hits
    jets = model.sample(SparseOutput(pixels, None, None, counts), seed=seed)
    hits = jets[..., 0] > 0  # model pixel i is image pixel i - 1 (the 128 -> 125 crop)
    assert (hits.sum((1, 2)) == 10).all()
    in_core = hits[:, 59:61, 59:64].sum((1, 2)).double()
    assert abs(float(in_core.mean()) - 5.0) < 4 * float(in_core.std()) / math.sqrt(b)


def test_counted_hits_go_where_the_pixels_are_likely(rng, seed):
    """With the count head, N hits are placed without replacement by the pixels' odds: a pixel of
    much higher probability is (almost) always among them, one of zero probability never."""
    model = SparseObservation((0.0,) * 3, (1.0,) * 3, components=1, count_log_mean=(np.log(6.0),) * 3,
                              count_log_std=(1.0,) * 3)
    b = 50
    pixels = torch.zeros(b, 3 * model.params, 128, 128)
    pixels[:, 0 :: model.params] = -30.0  # no chance at all
    pixels[:, 0 :: model.params, 40:50, 40:50] = 0.0  # 100 even chances
    pixels[:, 0 :: model.params, 45, 45] = 12.0  # a near-certain one
    counts = torch.zeros(b, 3, 2)
    counts[..., 1] = -6.0  # N + 1 = 6 every time: 5 hits
    jets = model.sample(SparseOutput(pixels, None, None, counts), seed=seed)
    tracks = jets[..., 0]
    assert ((tracks > 0).sum((1, 2)) == 5).all()
    assert (tracks[:, 44, 44] > 0).all()  # 128 -> 125 crop: model pixel 45 is image pixel 44
    outside = torch.ones(125, 125, dtype=torch.bool)
    outside[39:49, 39:49] = False
    assert not (tracks[:, outside] > 0).any()


@pytest.mark.parametrize("counted", [False, True])
def test_a_uniform_of_exactly_zero_hits_no_impossible_pixel(counted):
    """torch.rand draws exactly 0 once in 2^24 values: jet 133 of seed 2 has one as the hit uniform of
    Tracks pixel (56, 97). Its logit is -inf, so as a Pareto key it would put a hit there whatever
    the pixel's probability."""
    model = SparseObservation((0.0,) * 3, (1.0,) * 3, components=1, count_log_mean=(np.log(6.0),) * 3,
                              count_log_std=(1.0,) * 3)
    (tracks_draws, _, _), _ = model.noise(seed=2, start=133, count=1)
    assert tracks_draws[0, 0].min() > 0  # the stream's 0, lifted to half a step of its grid
    pixels = torch.zeros(1, 3 * model.params, 128, 128)
    pixels[:, 0 :: model.params] = -30.0
    pixels[:, 0 :: model.params, 10:20, 10:20] = 0.0
    counts = None
    if counted:
        counts = torch.zeros(1, 3, 2)
        counts[..., 1] = -6.0  # 5 hits
    tracks = model.sample(SparseOutput(pixels, None, None, counts), seed=2, start=133)[0, ..., 0]
    assert tracks[56, 97] == 0
    assert tracks[9:19, 9:19].count_nonzero() == (5 if counted else tracks.count_nonzero())


def _one_core_and_soft_hits(b: int, soft: int = 50):
    """Tracks of ``b`` jets hit at one core pixel (share: log-normal of sigma 1, mean 0.5) and at
    ``soft`` pixels of tight share (sigma 0.1, mean 0.5 / soft each): the expected shares add up to 1."""
    params = 3  # hit logit, loc, log scale
    out = torch.zeros(b, 3 * params, 128, 128)
    out[:, 0::params] = -30.0  # nothing hit ...
    pixels = [(62, 62)] + [(10 + 2 * (i // 10), 10 + 2 * (i % 10)) for i in range(soft)]
    for k, (row, col) in enumerate(pixels):
        sigma, mean = (1.0, 0.5) if k == 0 else (0.1, 0.5 / soft)
        out[:, 0, row + 1, col + 1] = 30.0  # ... but these Tracks pixels (the model's layout is padded by one)
        out[:, 1, row + 1, col + 1] = math.log(mean) - sigma**2 / 2
        out[:, 2, row + 1, col + 1] = math.log(sigma)
    return SparseOutput(out, torch.zeros(b, 3, 2)), pixels


def test_drawn_shares_are_conditioned_on_adding_up_to_one(seed):
    """With pixel shares, a sampled jet's shares are its independent draws conditioned on adding up
    to 1: the soft hits keep their expected share (scaling the draws by their sum would inflate it
    by E[1/S], here ~8%), the uncertain core takes up the difference, and the channel holds its total."""
    b, soft = 400, 50
    out, pixels = _one_core_and_soft_hits(b, soft)
    rows, cols = map(list, zip(*pixels))
    shares = {}
    for conditioned in (True, False):
        model = SparseObservation(pixel_shares=conditioned)
        jets = model.sample(out, seed=seed)[..., 0].double()
        assert (jets[:, rows, cols] > 0).all()  # every hit stays a hit
        shares[conditioned] = jets[:, rows, cols] / jets.sum(dim=(1, 2))[:, None]
    soft_mean = shares[True][:, 1:].mean()
    # expected 0.01; the draws' spread leaves ~0.1% standard error on this mean
    assert abs(float(soft_mean) / (0.5 / soft) - 1) < 0.01, float(soft_mean)
    assert float(shares[False][:, 1:].mean()) / (0.5 / soft) > 1.04  # the bias this removes
    # Each soft hit moves by its variance's share of the residual, ~1e-4 of it: its share keeps its own
    # spread (a sigma of 0.1: std 0.001), where scaling by the sum adds the core's through 1/S.
    assert abs(float(shares[True][:, 1:].std()) / (0.1 * 0.5 / soft) - 1) < 0.1
    assert float(shares[False][:, 1:].std()) > 2 * float(shares[True][:, 1:].std())


def test_shares_adding_to_one_against_numpy(rng):
    """The first-order conditioning against a direct float64 computation: the mixture's share
    variance from its moments, the residual spread in proportion, the floor, and no hits, no change."""
    k, b = 3, 4
    model = SparseObservation(log_mean=(-3.0, -4.0, -2.5), log_std=(1.2, 0.9, 1.1), components=k, pixel_shares=True)
    log_weight = torch.log_softmax(torch.from_numpy(rng.normal(0, 1, (b, k, 9, 11))).float(), dim=1)
    loc = torch.from_numpy(rng.normal(0, 1, (b, k, 9, 11))).float()
    log_scale = torch.from_numpy(rng.normal(-0.5, 0.5, (b, k, 9, 11))).float()
    hit = torch.from_numpy(rng.random((b, 9, 11)) < 0.3)
    hit[3] = False  # a jet without hits
    shares = torch.where(hit, torch.from_numpy(rng.lognormal(-3, 1, (b, 9, 11))).float(), 0.0)
    jet, row, col = hit.nonzero(as_tuple=True)
    mixture = (t[jet, :, row, col] for t in (log_weight, loc, log_scale))
    got = torch.zeros(b, 9, 11, dtype=torch.float64)
    got[jet, row, col] = model._shares_adding_to_one(shares[jet, row, col], jet, b, *mixture, 1).double()
    got = got.numpy()

    w, mu = np.exp(log_weight.double().numpy()), loc.double().numpy() * 0.9 - 4.0
    sigma = np.exp(log_scale.double().numpy()) * 0.9
    m1 = (w * np.exp(mu + sigma**2 / 2)).sum(1)
    m2 = (w * np.exp(2 * mu + 2 * sigma**2)).sum(1)
    var = np.where(hit.numpy(), m2 - m1**2, 0.0)
    s = shares.double().numpy()
    residual = 1 - s.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        want = s + np.nan_to_num(var / var.sum(axis=(1, 2), keepdims=True)) * residual[:, None, None]
    want = np.where(hit.numpy(), np.maximum(want, 0.05 * s), 0.0)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-7)
    assert (got[3] == 0).all() and ((got > 0) == hit.numpy()).all()
