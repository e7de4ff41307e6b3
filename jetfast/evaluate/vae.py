"""How well a trained VAE reconstructs the held-out test jets (``jetfast evaluate-vae``).

Everything is computed on the run's TEST split (``split.npz``), never seen in training or
model selection, with reconstructions decoded from the posterior mean ``mu`` (drawn from the
sparse observation model by default, ``decode="sample"``; ``"mean"`` gives the expected
image). Written to
``RUN_DIR/eval/`` (or ``--out``):

* ``metrics.json``: per channel (Tracks, ECAL, HCAL) and combined,
  - ``mse_gev2``: mean squared pixel error in GeV^2 (physical units, 125x125 crop);
  - ``total_energy_rel_error``: per-jet (reconstructed - true) / true channel sum, as
    mean/median/quantiles over jets with a non-zero true sum;
  - ``psnr_db`` and ``ssim`` on the transformed (log-standardised) images, where pixel
    values are O(1) and empty pixels are one constant, with ``data_range`` = max - min of
    the real test images in that space (in GeV, sparse images make both numbers dominated
    by the empty background and meaningless);
  - ``latent``: quark/gluon ROC AUC of a logistic regression on the latent means, fitted
    on a random half of the test jets and scored on the other half; PCA variance ratios;
  - ``anomaly_score``: per-jet mean squared error in transformed units, summarised per class.
* ``reconstructions.png``: originals beside reconstructions, per channel and combined, in
  GeV on a log color scale.
* ``latent_pca.png``: latent means projected on their first two principal components.
* ``anomaly_score.png``: distribution of the anomaly score per class.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from jetfast.data.format import CHANNELS, validate_jet_file
from jetfast.data.loader import JetLoader
from jetfast.data.transforms import crop_to_image
from jetfast.errors import InvalidArgument, RunDirError
from jetfast.models.vae import batch_conditions, load_vae, loader_keys
from jetfast.run import RunDir, check_split_fits, load_split, write_json

# Below this energy a pixel is drawn as empty: the reconstruction's soft floor
# (expm1 of a small positive number) would otherwise paint the whole image.
DISPLAY_MIN_GEV = 1e-3


# -- metrics -----------------------------------------------------------------------------------
def gaussian_ssim(x, y, data_range, sigma: float = 1.5, radius: int = 5, k1: float = 0.01, k2: float = 0.03):
    """Mean SSIM per image and channel, (B, C), with the Gaussian window of Wang et al. (2004).

    ``data_range`` is a per-channel tensor (C,). Borders are excluded (valid convolution),
    as in the reference implementation.
    """
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(offsets**2) / (2 * sigma**2))
    g = (g / g.sum()).to(x.dtype)
    channels = x.shape[1]
    gx = g.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    gy = g.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, gx, groups=channels), gy, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    dr = data_range.to(x.dtype).view(1, -1, 1, 1)
    c1, c2 = (k1 * dr) ** 2, (k2 * dr) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(2, 3))


def _summary(values) -> dict:

    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"n": 0}
    q = np.quantile(values, [0.05, 0.16, 0.5, 0.84, 0.95])
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        "median": float(q[2]),
        "q05": float(q[0]), "q16": float(q[1]), "q84": float(q[3]), "q95": float(q[4]),
        "abs_mean": float(np.abs(values).mean()),
    }


def _latent_auc(latents, labels, seed: int) -> dict:
    """Logistic regression on standardised latent means: fit on one random half of the test jets, score the other."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    protocol = "logistic regression on standardised latent means; fit on a random half of the test jets, ROC AUC on the other half"
    order = np.random.default_rng(seed).permutation(len(labels))
    fit, score = order[: len(order) // 2], order[len(order) // 2 :]
    if len(np.unique(labels[fit])) < 2 or len(np.unique(labels[score])) < 2:
        return {"qg_auc": None, "protocol": protocol, "note": "both classes are needed in each half; too few test jets"}
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(latents[fit], labels[fit])
    auc = roc_auc_score(labels[score], clf.predict_proba(latents[score])[:, 1])
    # A latent that separates the classes either way is informative: report the AUC as measured
    # (positive class y=1), it is > 0.5 when the classifier generalises.
    return {"qg_auc": round(float(auc), 4), "protocol": protocol, "n_fit": int(len(fit)), "n_score": int(len(score)),
            "positive_class": "y=1"}


def _transformed_range(data, indices, transform, batch_size):
    """Per-channel max - min of the real images in transformed space, (C,) float64."""
    low = torch.full((len(CHANNELS),), math.inf, dtype=torch.float64)
    high = torch.full((len(CHANNELS),), -math.inf, dtype=torch.float64)
    with JetLoader(data, batch_size, indices=indices, shuffle=False, transform=None, keys=("X_jets",),
                   rank=0, world_size=1) as loader:
        for batch in loader:
            physical = batch["X_jets"]
            low = torch.minimum(low, physical.double().amin(dim=(0, 2, 3)))
            high = torch.maximum(high, physical.double().amax(dim=(0, 2, 3)))
    # The transform is monotonic per channel, so the range maps through it.
    ends = transform.forward(torch.stack([low, high]).view(2, -1, 1, 1)).view(2, -1)
    return (ends[1] - ends[0]).clamp_min(1e-12)


# -- plots -------------------------------------------------------------------------------------
def _plot_reconstructions(originals, reconstructions, labels, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    n = len(originals)
    names = [*CHANNELS, "combined"]
    fig, axes = plt.subplots(n, 2 * len(names), figsize=(1.9 * 2 * len(names), 1.9 * n + 0.5), squeeze=False,
                             layout="constrained")
    for i in range(n):
        for c, name in enumerate(names):
            true = originals[i].sum(-1) if name == "combined" else originals[i, :, :, c]
            reco = reconstructions[i].sum(-1) if name == "combined" else reconstructions[i, :, :, c]
            vmax = max(float(true.max()), float(reco.max()), DISPLAY_MIN_GEV * 10)
            norm = LogNorm(vmin=DISPLAY_MIN_GEV, vmax=vmax)
            for k, (image, kind) in enumerate(((true, "true"), (reco, "VAE"))):
                ax = axes[i, 2 * c + k]
                shown = np.ma.masked_less(image, DISPLAY_MIN_GEV)
                im = ax.imshow(shown, norm=norm, cmap="viridis", origin="lower", interpolation="nearest")
                ax.set_facecolor("black")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"{name} {kind}", fontsize=8)
                if k == 0 and c == 0:
                    ax.set_ylabel(f"jet {i} (y={int(labels[i])})", fontsize=8)
            fig.colorbar(im, ax=axes[i, 2 * c : 2 * c + 2], fraction=0.05, pad=0.02).ax.tick_params(labelsize=6)
    fig.suptitle(f"test jets and VAE reconstructions (GeV, log scale, pixels < {DISPLAY_MIN_GEV} GeV blank)", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_pca(latents, labels, path: Path) -> list[float]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    k = min(2, latents.shape[1], len(latents))
    pca = PCA(n_components=k).fit(latents)
    projected = pca.transform(latents)
    fig, ax = plt.subplots(figsize=(5, 4.4))
    for value, color in ((0, "tab:orange"), (1, "tab:blue")):
        mask = labels == value
        ys = projected[mask, 1] if k > 1 else 0 * projected[mask, 0]
        ax.scatter(projected[mask, 0], ys, s=5, alpha=0.5, c=color, label=f"y={value}")
    ratio = pca.explained_variance_ratio_.tolist()
    ax.set_xlabel(f"PC1 ({100 * ratio[0]:.1f}% of variance)")
    if k > 1:
        ax.set_ylabel(f"PC2 ({100 * ratio[1]:.1f}% of variance)")
    ax.set_title("latent means of test jets (jetfast files: y=1 quark, y=0 gluon)", fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ratio


def _plot_anomaly(scores, labels, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    positive = scores[scores > 0]
    bins = np.geomspace(positive.min(), positive.max() * 1.001, 40) if positive.size and positive.max() > positive.min() else 30
    for value, color in ((0, "tab:orange"), (1, "tab:blue")):
        if (labels == value).any():  # a small test set may hold one class only: no density of nothing
            ax.hist(scores[labels == value], bins=bins, histtype="step", color=color, label=f"y={value}", density=True)
    if not isinstance(bins, int):
        ax.set_xscale("log")
    ax.set_xlabel("anomaly score: mean squared error per pixel (transformed units)")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the evaluation ----------------------------------------------------------------------------
def evaluate_vae(
    run_dir,
    *,
    data=None,
    out=None,
    max_jets: int | None = None,
    checkpoint: str = "best",
    batch_size: int = 64,
    show: int = 4,
    seed: int = 0,
    decode: str = "sample",
    progress: bool = True,
) -> dict:
    """Evaluate the VAE of ``run_dir`` on its test jets; write metrics.json and the plots into
    ``out`` (default ``RUN_DIR/eval``) and return the metrics.

    ``decode`` is how reconstructions are decoded from ``mu``: "sample" (seeded by ``seed``)
    or "mean".

    ``data`` is the jet file (default: the one the run was trained on); ``max_jets`` caps the
    test jets; ``checkpoint`` is "best" or "last"; ``show`` jets are drawn in
    reconstructions.png; ``seed`` draws the halves of the latent classifier.
    """
    if batch_size < 1 or show < 1:
        raise InvalidArgument(f"need --batch-size >= 1 and --show >= 1; got {batch_size}, {show}")
    run = RunDir(run_dir)
    data = run.data_file(data)
    n_file = validate_jet_file(data)
    split = load_split(run)
    check_split_fits(split, n_file, data)
    test = split["test"]
    if max_jets is not None:
        if max_jets < 1:
            raise InvalidArgument(f"--max-jets must be >= 1; got {max_jets}")
        test = test[: max_jets]
    if len(test) == 0:
        raise RunDirError("the run's test split is empty")
    model, transform, config = load_vae(run.path, which=checkpoint)
    out = Path(out) if out else run.eval_dir
    out.mkdir(parents=True, exist_ok=True)

    # PSNR and SSIM need the data range of the real test images in transformed space before
    # the main pass; reading the pixels once more is cheap beside the model.
    data_range = _transformed_range(data, test, transform, batch_size)

    # Physical-unit batches (padded only): the originals stay exact, the model input is
    # transformed here, and the reconstruction goes back through the exact inverse.
    loader = JetLoader(data, batch_size, indices=test, shuffle=False, transform=None, rank=0, world_size=1,
                       keys=loader_keys(config, "X_jets", "y"))
    n_ch = len(CHANNELS)
    sq_err = np.zeros(n_ch + 1)
    true_sums, reco_sums, latents, labels, scores, psnr, ssim = [], [], [], [], [], [], []
    shown_true, shown_reco, shown_labels = [], [], []
    jets_done = 0
    with torch.no_grad():
        for batch in tqdm(loader, desc="evaluate-vae", unit="batch", disable=not progress, leave=False):
            physical = batch["X_jets"]
            x = transform.forward(physical)
            conditions = batch_conditions(batch, config)
            mu, _ = model.encode(x, conditions)
            reco_img = model.images(mu, transform, conditions, mode=decode, seed=seed, start=jets_done).double()  # (B, 125, 125, 3) GeV
            jets_done += len(mu)
            x_hat = transform.to_model(reco_img.float())
            true_img = crop_to_image(physical).double()
            diff = reco_img - true_img
            pixels = diff.shape[1] * diff.shape[2]
            sq_err[:n_ch] += diff.pow(2).sum(dim=(0, 1, 2)).numpy() / pixels
            sq_err[n_ch] += diff.sum(-1).pow(2).sum().item() / pixels
            true_sums.append(true_img.sum(dim=(1, 2)).numpy())
            reco_sums.append(reco_img.sum(dim=(1, 2)).numpy())
            latents.append(mu.double().numpy())
            labels.append(batch["y"].numpy())
            mse_t = (x_hat - x).double().pow(2).mean(dim=(2, 3))  # (B, C), transformed units
            scores.append(mse_t.mean(1).numpy())
            psnr.append((10 * torch.log10(data_range.view(1, -1) ** 2 / mse_t.clamp_min(1e-20))).numpy())
            ssim.append(gaussian_ssim(x.double(), x_hat.double(), data_range).numpy())
            if sum(len(s) for s in shown_true) < show:
                need = show - sum(len(s) for s in shown_true)
                shown_true.append(true_img[:need].float().numpy())
                shown_reco.append(reco_img[:need].float().numpy())
                shown_labels.append(batch["y"][:need].numpy())
    loader.close()

    n = len(test)
    true_sums, reco_sums = np.concatenate(true_sums), np.concatenate(reco_sums)
    latents, labels, scores = np.concatenate(latents), np.concatenate(labels).astype(int), np.concatenate(scores)
    psnr, ssim = np.concatenate(psnr), np.concatenate(ssim)

    def rel_error(true, reco):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(true > 0, (reco - true) / true, np.nan)

    channels = {}
    for c, name in enumerate(CHANNELS):
        channels[name] = {
            "mse_gev2": float(sq_err[c] / n),
            "total_energy_rel_error": _summary(rel_error(true_sums[:, c], reco_sums[:, c])),
            "psnr_db": _summary(psnr[:, c]),
            "ssim": _summary(ssim[:, c]),
            "data_range_transformed": float(data_range[c]),
        }
    combined = {
        "mse_gev2": float(sq_err[n_ch] / n),
        "total_energy_rel_error": _summary(rel_error(true_sums.sum(1), reco_sums.sum(1))),
    }

    files = {"metrics": "metrics.json", "reconstructions": "reconstructions.png",
             "latent_pca": "latent_pca.png", "anomaly_score": "anomaly_score.png"}
    _plot_reconstructions(np.concatenate(shown_true), np.concatenate(shown_reco), np.concatenate(shown_labels),
                          out / files["reconstructions"])
    pca_ratio = _plot_pca(latents, labels, out / files["latent_pca"])
    _plot_anomaly(scores, labels, out / files["anomaly_score"])

    metrics = {
        "run_dir": str(run.path),
        "checkpoint": checkpoint,
        "data": os.path.abspath(data),
        "split": "test",
        "n_test_jets": int(n),
        "reconstruction": f"decoded from the posterior mean mu ({decode} decoding: "
                          + ("hits and intensities drawn from the observation model" if decode == "sample" else "the expected image")
                          + "), 125x125 in GeV",
        "channels": channels,
        "combined": combined,
        "psnr_ssim_note": "computed on transformed (log-standardised) images with data_range = max - min of the real "
                          "test images per channel; SSIM uses an 11x11 Gaussian window (sigma 1.5), K1=0.01, K2=0.03. Both are "
                          "dominated by the empty background of sparse jets (SSIM stays near 1 for blurred jets): "
                          "read them beside the energy errors",
        "latent": {**_latent_auc(latents, labels, seed), "pca_explained_variance_ratio": pca_ratio,
                   "latent_dim": int(latents.shape[1])},
        "anomaly_score": {
            "definition": "per-jet mean squared reconstruction error per pixel, transformed units",
            **{f"y={v}": _summary(scores[labels == v]) for v in (0, 1)},
        },
        "files": files,
        "out_dir": str(out),
    }
    write_json(out / files["metrics"], metrics)
    return metrics

