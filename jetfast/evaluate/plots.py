"""The report's plots: real against generated jets, drawn in the CMS style (mplhep).

Each function draws one figure from two :class:`~jetfast.evaluate.reader.JetSample` (the
response plots also from the numbers of :func:`jetfast.evaluate.response.detector_response`)
and writes it to ``path``; no global matplotlib state (backend, figure registry) is touched.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from jetfast.data.format import CHANNELS, CLASS_NAMES, GLUON, QUARK
from jetfast.evaluate.observables import OBSERVABLES, PROFILE_EDGES
from jetfast.evaluate.reader import SPECTRUM_EDGES, JetSample
from jetfast.evaluate.response import GEN_REQUESTED, REAL_REQUESTED, bin_index, jet_response

EXAMPLE_CROP = slice(31, 94)  # central 63x63 pixels (|eta|, |phi| < 0.55) where the jet lives
REAL_COLOR, GEN_COLOR = "#3f90da", "#e42536"  # from the colour-blind-safe CMS palette
CLASS_COLORS = {QUARK: "#3f90da", GLUON: "#e76300"}


class _Figures:
    """pyplot's figure constructors without pyplot: no global backend or figure registry is
    touched, so making a report from a notebook or a GUI session leaves it as it was."""

    @staticmethod
    def figure(figsize):
        from matplotlib.figure import Figure

        return Figure(figsize=figsize)

    @staticmethod
    def subplots(nrows, ncols, figsize, **kwargs):
        fig = _Figures.figure(figsize)
        return fig, fig.subplots(nrows, ncols, **kwargs)

    @staticmethod
    def close(fig):
        fig.clear()


@contextmanager
def _style():
    """The CMS look (mplhep) at a font size that suits figure grids, for the enclosed plots."""
    import matplotlib
    import mplhep

    grid_fonts = {
        "font.size": 12, "axes.labelsize": 12, "axes.titlesize": 12, "legend.fontsize": 10,
        "xtick.labelsize": 10, "ytick.labelsize": 10,
        # minor ticks on dozens of small panels cost most of the drawing time
        "xtick.minor.visible": False, "ytick.minor.visible": False,
    }
    with matplotlib.style.context(mplhep.style.CMS), matplotlib.rc_context(grid_fonts):
        yield _Figures


def _bins(*samples, n_bins: int = 40) -> np.ndarray:
    """Common bins over the central 99.8% of the pooled samples (tails land in the edge bins).

    Counts get at most about ``n_bins`` bins of whole steps of their lattice (HCAL pixels come 25
    at a time, one tower), centred on it: equal-width bins would hold one possible value or none
    (a comb of empty bins), and one bin per value over a range of ~100 counts leaves a few jets per
    bin of a test sample, a comb of Poisson noise."""
    pooled = np.concatenate([np.asarray(s, np.float64) for s in samples if len(s)])
    lo, hi = np.quantile(pooled, [0.001, 0.999])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    if np.allclose(pooled, np.round(pooled)) and np.abs(pooled).max() < 2**52:
        values = np.unique(np.round(pooled).astype(np.int64))
        step = int(np.gcd.reduce(np.diff(values))) if len(values) > 1 else 1
        per_bin = max(1, math.ceil((hi - lo) / (n_bins * step)))  # possible values per bin
        first = values[0] + step * math.floor((lo - values[0]) / step)  # the lattice value at or below lo
        return np.arange(first - step / 2, hi + per_bin * step, per_bin * step)
    return np.linspace(lo, hi, n_bins + 1)


def _density(values, bins) -> tuple[np.ndarray, np.ndarray]:
    """Normalised histogram with under/overflow folded into the edge bins, and its Poisson error."""
    counts, _ = np.histogram(np.clip(values, bins[0], bins[-1]), bins=bins)
    norm = max(counts.sum(), 1) * np.diff(bins)
    return counts / norm, np.sqrt(counts) / norm


def _grid(n: int, columns: int = 4) -> tuple[int, int]:
    return math.ceil(n / columns), min(columns, n)


def plot_observables(real: JetSample, gen: JetSample, path: Path, cls: int | None = None) -> Path:
    """Real vs generated histograms of every observable, each with a generated/real ratio panel."""
    names = list(OBSERVABLES)
    with _style() as plt:
        rows, cols = _grid(len(names))
        fig = plt.figure((4.2 * cols, 3.6 * rows))
        outer = fig.add_gridspec(rows, cols, hspace=0.45, wspace=0.3, top=1 - 0.35 / rows,
                                 left=0.05, right=0.98, bottom=0.25 / rows)
        r_mask = slice(None) if cls is None else real.labels == cls
        g_mask = slice(None) if cls is None else gen.labels == cls
        for i, name in enumerate(names):
            inner = outer[i // cols, i % cols].subgridspec(2, 1, height_ratios=(3, 1), hspace=0.05)
            ax, ax_ratio = fig.add_subplot(inner[0]), fig.add_subplot(inner[1])
            r, g = real.observables[name][r_mask], gen.observables[name][g_mask]
            bins = _bins(r, g)
            hr, er = _density(r, bins)
            hg, eg = _density(g, bins)
            ax.stairs(hr, bins, fill=True, alpha=0.35, color=REAL_COLOR, label="real")
            ax.stairs(hg, bins, color=GEN_COLOR, linewidth=1.5, label="generated")
            ax.set_xticklabels([])
            ax.set_ylabel("density")
            ax.set_xlim(bins[0], bins[-1])
            if i == 0:
                ax.legend(frameon=False)
            centers = 0.5 * (bins[1:] + bins[:-1])
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = hg / hr
                ratio_err = ratio * np.hypot(eg / hg, er / hr)
            ax_ratio.errorbar(centers, ratio, yerr=ratio_err, fmt="o", ms=2.5, color="black", elinewidth=0.8)
            ax_ratio.axhline(1.0, color="gray", lw=0.8)
            ax_ratio.set_ylim(0.4, 1.6)
            ax_ratio.set_yticks([0.5, 1.0, 1.5])
            ax_ratio.set_xlim(bins[0], bins[-1])
            ax_ratio.set_ylabel("gen/real", fontsize=9)
            ax_ratio.set_xlabel(OBSERVABLES[name])
        title = "all jets" if cls is None else f"{CLASS_NAMES[cls]} jets (y={cls})"
        fig.suptitle(f"Observables, real vs generated: {title}")
        fig.savefig(path, dpi=90)
        plt.close(fig)
    return path


def plot_classes(real: JetSample, gen: JetSample, path: Path) -> Path:
    """Quark and gluon jets, real (filled) and generated (lines), for every observable."""
    names = list(OBSERVABLES)
    with _style() as plt:
        rows, cols = _grid(len(names))
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
        for i, name in enumerate(names):
            ax = axes[i // cols, i % cols]
            bins = _bins(real.observables[name], gen.observables[name])
            for cls, label in CLASS_NAMES.items():
                hr, _ = _density(real.observables[name][real.labels == cls], bins)
                hg, _ = _density(gen.observables[name][gen.labels == cls], bins)
                ax.stairs(hr, bins, fill=True, alpha=0.3, color=CLASS_COLORS[cls], label=f"{label} real")
                ax.stairs(hg, bins, color=CLASS_COLORS[cls], linewidth=1.5, label=f"{label} gen")
            ax.set_xlabel(OBSERVABLES[name])
            ax.set_xlim(bins[0], bins[-1])
            if i == 0:
                ax.legend(frameon=False, fontsize=8)
        _finish_grid(fig, axes, len(names), "Quark vs gluon jets: real (filled) and generated (lines)", path)
    return path


def _finish_grid(fig, axes, used: int, title: str, path: Path) -> None:
    """Hide the grid's unused panels, title it, save it and close it."""
    import matplotlib.pyplot as plt

    for ax in axes.flat[used:]:
        ax.set_visible(False)
    fig.suptitle(title, y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


def plot_mean_images(real: JetSample, gen: JetSample, path: Path) -> Path:
    """Mean image per channel, real and generated, and generated/real (masked where real is 0)."""
    from matplotlib.colors import LogNorm

    mean_real, mean_gen = real.mean_image(), gen.mean_image()
    with _style() as plt:
        fig, axes = plt.subplots(3, 3, figsize=(13, 12))
        for c, channel in enumerate(CHANNELS):
            r, g = mean_real[..., c], mean_gen[..., c]
            positive = np.concatenate([r[r > 0], g[g > 0]])
            vmax = positive.max() if positive.size else 1.0
            vmin = max(np.quantile(positive, 0.01) if positive.size else 1e-6, vmax * 1e-6)
            norm = LogNorm(vmin=vmin, vmax=vmax)
            for col, (image, who) in enumerate(((r, "real"), (g, "generated"))):
                ax = axes[c, col]
                im = ax.imshow(np.ma.masked_less_equal(image, 0), norm=norm, cmap="viridis", origin="lower")
                ax.set_title(f"{channel}, mean {who}")
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="GeV")
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.ma.masked_where(r <= 0, g / r)
            im = axes[c, 2].imshow(ratio, norm=LogNorm(vmin=0.1, vmax=10), cmap="RdBu_r", origin="lower")
            axes[c, 2].set_title(f"{channel}, generated / real")
            fig.colorbar(im, ax=axes[c, 2], fraction=0.046, pad=0.02)
        for ax in axes.flat:
            ax.set_xlabel(r"$\phi$ pixel")
            ax.set_ylabel(r"$\eta$ pixel")
        fig.tight_layout()
        fig.savefig(path, dpi=80, bbox_inches="tight", pad_inches=0.1)
        plt.close(fig)
    return path


def plot_jets(sample: JetSample, path: Path, who: str) -> Path:
    """A few random jets: one row per jet, one column per channel plus their sum, log colour."""
    from matplotlib.colors import LogNorm

    jets = sample.examples
    if len(jets) == 0:
        return None
    jets = jets[:, EXAMPLE_CROP, EXAMPLE_CROP]
    columns = [jets[..., c] for c in range(3)] + [jets.sum(-1)]  # each (k, h, w)
    with _style() as plt:
        fig, axes = plt.subplots(len(jets), 4, figsize=(12, 3 * len(jets) + 0.8), squeeze=False)
        fig.subplots_adjust(top=1 - 0.6 / (3 * len(jets) + 0.8), hspace=0.06, wspace=0.06)
        for col, (stack, title) in enumerate(zip(columns, (*CHANNELS, "Tracks+ECAL+HCAL"))):
            # One log scale per column, shared by the jets: sizes and spreads compare at a glance.
            positive = stack[stack > 0]
            vmax = positive.max() if positive.size else 1.0
            norm = LogNorm(vmin=max(vmax * 1e-4, 1e-6), vmax=vmax)
            for i in range(len(jets)):
                ax = axes[i, col]
                im = ax.imshow(np.ma.masked_less_equal(stack[i], 0), cmap="viridis", origin="lower", norm=norm)
                ax.set_facecolor("#0b0b2a")
                ax.set_xticks([])
                ax.set_yticks([])
            axes[0, col].set_title(title)
            fig.colorbar(im, ax=axes[:, col], orientation="horizontal", fraction=0.03, pad=0.02, label="GeV")
        fig.suptitle(f"Random {who} jets: central 63x63 pixels, log colour")
        fig.savefig(path, dpi=70, bbox_inches="tight", pad_inches=0.1)
        plt.close(fig)
    return path


def plot_radial_profile(real: JetSample, gen: JetSample, path: Path) -> Path:
    """Mean fraction of calorimeter pT per annulus of dR, all jets and per class."""
    centers = 0.5 * (PROFILE_EDGES[1:] + PROFILE_EDGES[:-1])
    with _style() as plt:
        fig, (ax, ax_ratio) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True, gridspec_kw={"height_ratios": (3, 1)})
        curves = [("all", None, "black")]
        if real.labels is not None and gen.labels is not None:
            curves += [(CLASS_NAMES[c], c, CLASS_COLORS[c]) for c in CLASS_NAMES]
        for label, cls, color in curves:
            r = real.profile if cls is None else real.profile[real.labels == cls]
            g = gen.profile if cls is None else gen.profile[gen.labels == cls]
            if len(r) == 0 or len(g) == 0:
                continue
            ax.stairs(r.mean(0), PROFILE_EDGES, color=color, linewidth=1.5, label=f"{label} real")
            ax.errorbar(centers, g.mean(0), yerr=g.std(0) / np.sqrt(len(g)), fmt="o", ms=3, color=color,
                        label=f"{label} generated")
            # The ratio only where real jets carry at least 0.1% of their pT: beyond, it is noise.
            shown = r.mean(0) > 1e-3
            ax_ratio.plot(centers[shown], g.mean(0)[shown] / r.mean(0)[shown], "o-", ms=3, color=color)
        ax.set_yscale("log")
        ax.set_ylabel(r"mean $p_T$ fraction per annulus")
        ax.legend(frameon=False, ncol=2, fontsize=9)
        ax_ratio.axhline(1.0, color="gray", lw=0.8)
        ax_ratio.set_ylim(0.5, 1.5)
        ax_ratio.set_ylabel("gen/real")
        ax_ratio.set_xlabel(r"$\Delta R$ from the jet axis")
        fig.tight_layout()
        fig.savefig(path, dpi=90, bbox_inches="tight", pad_inches=0.1)
        plt.close(fig)
    return path


def plot_pixel_spectrum(real: JetSample, gen: JetSample, path: Path) -> Path:
    """Distribution of non-zero pixel values per channel (per jet), real vs generated."""
    with _style() as plt:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for c, channel in enumerate(CHANNELS):
            ax = axes[c]
            ax.stairs(real.spectrum[c] / real.n, SPECTRUM_EDGES, fill=True, alpha=0.35, color=REAL_COLOR, label="real")
            ax.stairs(gen.spectrum[c] / gen.n, SPECTRUM_EDGES, color=GEN_COLOR, linewidth=1.5, label="generated")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(f"{channel} pixel value [GeV]")
            ax.set_ylabel("pixels per jet per bin")
            ax.legend(frameon=False)
        fig.tight_layout()
        fig.savefig(path, dpi=90, bbox_inches="tight", pad_inches=0.1)
        plt.close(fig)
    return path


def plot_ladder_jets(rows: list[tuple[str, JetSample]], path: Path, per_row: int = 4) -> Path:
    """Random jets of every row of the fidelity ladder: Tracks+ECAL+HCAL, one log scale for all."""
    from matplotlib.colors import LogNorm

    rows = [(label, sample.examples[:per_row, EXAMPLE_CROP, EXAMPLE_CROP].sum(-1)) for label, sample in rows]
    positive = np.concatenate([jets[jets > 0] for _, jets in rows] or [np.ones(1)])
    vmax = float(positive.max()) if positive.size else 1.0
    norm = LogNorm(vmin=max(vmax * 1e-4, 1e-6), vmax=vmax)
    with _style() as plt:
        height = 2.75 * len(rows) + 0.6
        fig, axes = plt.subplots(len(rows), per_row, figsize=(2.6 * per_row, height), squeeze=False)
        fig.subplots_adjust(hspace=0.25, wspace=0.05, top=1 - 0.75 / height)  # the title just above the first row
        image = None
        for r, (label, jets) in enumerate(rows):
            for i in range(per_row):
                ax = axes[r, i]
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_facecolor("#0b0b2a")
                if i < len(jets):
                    image = ax.imshow(np.ma.masked_less_equal(jets[i], 0), cmap="viridis", origin="lower", norm=norm)
            axes[r, 0].set_title(f"{r}. {label}", loc="left", fontsize=11)
        if image is not None:
            fig.colorbar(image, ax=axes, orientation="horizontal", fraction=0.02, pad=0.02, label="Tracks+ECAL+HCAL [GeV]")
        fig.suptitle("The fidelity ladder: random jets of every row (central 63x63 pixels)", y=1 - 0.15 / height)
        fig.savefig(path, dpi=70, bbox_inches="tight", pad_inches=0.1)
        plt.close(fig)
    return path


def _bin_label(entry: dict) -> str:
    return f"{entry['lo']:g}-{entry['hi']:g} GeV"


def plot_response(response: dict, path: Path) -> Path:
    """Mean and width of the response against generator-level pT: real jets as a band of ±1
    bootstrap error per bin, generated jets as points; open points for bins with too few jets."""
    bins = response["bins"]
    with _style() as plt:
        fig, axes = plt.subplots(2, 1, figsize=(7.5, 7.5), sharex=True, gridspec_kw={"hspace": 0.08})
        for ax, quantity, label in ((axes[0], "mean", "mean response"), (axes[1], "width", "response width (std)")):
            for b in bins:
                real, gen = b["real"], b["gen"]
                if real[quantity] is not None:
                    err = real[f"{quantity}_err"]
                    err = err if err is not None and np.isfinite(err) else 0.0
                    ax.fill_between([b["lo"], b["hi"]], real[quantity] - err, real[quantity] + err, color=REAL_COLOR,
                                    alpha=0.35 if b["enough"] else 0.15, linewidth=0)
                    ax.hlines(real[quantity], b["lo"], b["hi"], color=REAL_COLOR, linewidth=1.5)
                if gen[quantity] is not None:
                    err = gen[f"{quantity}_err"]
                    ax.errorbar(0.5 * (b["lo"] + b["hi"]), gen[quantity],
                                yerr=err if err is not None and np.isfinite(err) else None,
                                fmt="o", ms=5, color=GEN_COLOR, mfc=GEN_COLOR if b["enough"] else "white",
                                elinewidth=1.2, capsize=2)
            ax.set_ylabel(label)
            ax.margins(y=0.25)
        edges = response["edges"]
        axes[1].set_xlim(edges[0], edges[-1])
        axes[1].set_xlabel(f"generator-level $p_T$ [GeV] (real: {REAL_REQUESTED}, generated: {GEN_REQUESTED})")
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        handles = [(Patch(color=REAL_COLOR, alpha=0.35, linewidth=0), Line2D([], [], color=REAL_COLOR)),
                   Line2D([], [], ls="", marker="o", ms=5, color=GEN_COLOR)]
        labels = ["real ± error", "generated"]
        if any(not b["enough"] for b in bins):
            handles.append(Line2D([], [], ls="", marker="o", ms=5, color=GEN_COLOR, mfc="white"))
            labels.append(f"fewer than {response['min_jets']} jets: not judged")
        axes[0].legend(handles, labels, frameon=False, ncol=3, loc="upper center")
        fig.suptitle("Detector response: image $p_T$ / generator-level $p_T$", y=0.94)
        fig.savefig(path, dpi=90, bbox_inches="tight", pad_inches=0.1)
        plt.close(fig)
    return path


def plot_response_histograms(real: JetSample, gen: JetSample, response: dict, path: Path) -> Path:
    """The response distributions of real (filled) and generated (line) jets, one panel per bin
    of generator-level pT, on one response axis."""
    edges = np.asarray(response["edges"])
    real_pt, real_r, _ = jet_response(real, REAL_REQUESTED)
    gen_pt, gen_r, _ = jet_response(gen, GEN_REQUESTED)
    real_bin, gen_bin = bin_index(real_pt, edges), bin_index(gen_pt, edges)
    axis = _bins(real_r[real_bin >= 0], gen_r[gen_bin >= 0], n_bins=30)
    entries = response["bins"]
    with _style() as plt:
        rows, cols = _grid(len(entries))
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
        for b, entry in enumerate(entries):
            ax = axes[b // cols, b % cols]
            r, g = real_r[real_bin == b], gen_r[gen_bin == b]
            if len(r):
                ax.stairs(_density(r, axis)[0], axis, fill=True, alpha=0.35, color=REAL_COLOR, label="real")
            if len(g):
                ax.stairs(_density(g, axis)[0], axis, color=GEN_COLOR, linewidth=1.5, label="generated")
            ratio = entry["ratio"]
            ax.set_title(_bin_label(entry) + ("" if entry["enough"] else " (too few)"), fontsize=11)
            ax.text(0.97, 0.95, f"n {len(r)} / {len(g)}" + ("" if ratio is None else f"\nW/floor {ratio:.2g}"),
                    transform=ax.transAxes, ha="right", va="top", fontsize=9)
            ax.set_xlim(axis[0], axis[-1])
            ax.set_xlabel("response")
            if b % cols == 0:
                ax.set_ylabel("density")
            if b == 0:
                ax.legend(frameon=False, fontsize=9, loc="upper left")
        _finish_grid(fig, axes, len(entries), "Response per bin of generator-level $p_T$: real (filled) and generated (line)",
                     path)
    return path


def plot_pt_spectrum(real: JetSample, gen: JetSample, response: dict, path: Path) -> Path:
    """Generator-level pT (dashed: what real jets had, what generated jets were asked for) and
    image pT (real filled, generated line) of all jets, with the response bins' edges."""
    real_pt, _, _ = jet_response(real, REAL_REQUESTED)
    gen_pt, _, _ = jet_response(gen, GEN_REQUESTED)
    real_image, gen_image = real.observables["pt"], gen.observables["pt"]
    axis = _bins(real_pt, gen_pt, real_image, gen_image, n_bins=50)
    with _style() as plt:
        fig, ax = plt.subplots(1, 1, figsize=(8, 5))
        for edge in response["edges"]:
            ax.axvline(edge, color="gray", lw=0.6, alpha=0.5)
        ax.stairs(_density(real_image, axis)[0], axis, fill=True, alpha=0.35, color=REAL_COLOR,
                  label="real, image $p_T$")
        ax.stairs(_density(gen_image, axis)[0], axis, color=GEN_COLOR, linewidth=1.8, label="generated, image $p_T$")
        ax.stairs(_density(real_pt, axis)[0], axis, color=REAL_COLOR, linewidth=1.5, linestyle="--",
                  label=f"real, generator-level $p_T$ ({REAL_REQUESTED})")
        ax.stairs(_density(gen_pt, axis)[0], axis, color="black", linewidth=1.5, linestyle="--",
                  label=f"generated, requested $p_T$ ({GEN_REQUESTED})")
        ax.set_xlim(axis[0], axis[-1])
        ax.set_xlabel("jet $p_T$ [GeV] (grey lines: response bins)")
        ax.set_ylabel("fraction of jets per GeV")
        ax.legend(frameon=False, fontsize=9)
        ax.set_title("Jet $p_T$: generator-level (dashed) and from the image (solid)")
        fig.tight_layout()
        fig.savefig(path, dpi=90, bbox_inches="tight", pad_inches=0.1)
        plt.close(fig)
    return path
