"""``jetfast evaluate``: compare generated jets with real ones and write a physics report.

Both files are streamed in chunks (memory stays bounded for 100k+ jets); every jet goes
through :func:`jetfast.evaluate.observables.compute_observables`, the same function for
real and generated jets. The output directory explains itself::

    OUT/
      report.html     self-contained page (plots embedded), the thing to open
      report.md       the same report in Markdown, linking plots/*.png
      metrics.json    every number of the report (distances, floors, AUCs, counts, options)
      plots/          observables.png, classes.png (quark vs gluon), mean_images.png,
                      jets_real.png, jets_generated.png, radial_profile.png, pixel_spectrum.png

metrics.json keys: ``real``/``gen`` (paths, jets used, dropped), ``options``, ``notes``,
``summary`` (median distance/floor ratio, farthest observable), ``distances`` and
``distances_by_class`` (see :func:`jetfast.evaluate.metrics.distance_table`), ``c2st``,
``c2st_cnn`` (with ``--cnn``), ``quark_gluon``, ``radial_profile``, ``plots``, ``timing_s``.
A test that could not run holds ``{"skipped": "<why>"}`` instead of numbers.

Real jets are the held-out test split of a training run when ``--run`` is given (its
``split.npz``, key ``test``), otherwise all jets of ``--real``. Jets with NaN or inf pixels
are dropped, counted and reported (``n_nonfinite``); a file with no finite jet is an error.
Files are written to ``*.tmp`` first and renamed, so a crash never leaves half a report.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jetfast.data.format import CHANNELS, CLASS_NAMES, GLUON, IMAGE_KEY, IMAGE_SIZE, LABEL_KEY, QUARK
from jetfast.errors import InvalidArgument, JetFileError
from jetfast.evaluate.observables import DEFAULT_THRESHOLDS, OBSERVABLES, PROFILE_EDGES, compute_observables

SPECTRUM_EDGES = np.logspace(-6, 3, 91)  # pixel values (GeV) of the pixel-intensity spectrum
N_EXAMPLES = 4  # jets drawn in each example grid
EXAMPLE_CROP = slice(31, 94)  # central 63x63 pixels (|eta|, |phi| < 0.55) where the jet lives
DEFAULT_CHUNK_JETS = 512  # ~100 MB of images per chunk


# -- streaming a jet file into per-jet observables and running sums ----------------------------
@dataclass
class JetSample:
    """What the report needs from one file, gathered in one streaming pass."""

    path: str
    n_file: int
    observables: dict[str, np.ndarray]
    profile: np.ndarray  # (N, n_annuli) fraction of calorimeter pT per annulus
    labels: np.ndarray | None  # (N,) int8, None when the file has no usable y
    image_sum: dict  # "all" / class -> (125, 125, 3) float64 sum of images
    jets_per_key: dict  # "all" / class -> number of jets in image_sum
    spectrum: np.ndarray  # (3, len(SPECTRUM_EDGES) - 1) pixel counts per channel
    examples: np.ndarray  # (k, 125, 125, 3) a few random jets
    coarse: np.ndarray | None = None  # (m, 25, 25, 3) 5x5-summed images of random jets, for the CNN test
    coarse_labels: np.ndarray | None = None
    n_nonfinite: int = 0
    n_negative: int = 0
    label_note: str = ""
    notes: list = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.profile)

    def mean_image(self, key="all") -> np.ndarray | None:
        count = self.jets_per_key.get(key, 0)
        return self.image_sum[key] / count if count else None


def _read_labels(f, path: str, n: int) -> tuple[np.ndarray | None, str]:
    if LABEL_KEY not in f:
        return None, f"{path} has no {LABEL_KEY!r}: per-class results are skipped"
    y = np.asarray(f[LABEL_KEY][...])
    if y.shape != (n,):
        raise JetFileError(f"{path}:{LABEL_KEY} has shape {y.shape}; expected ({n},) to match {IMAGE_KEY}")
    if not np.isin(y, (0, 1)).all():
        # e.g. y = -1 in files of unconditional generation
        return None, (f"{path}:{LABEL_KEY} holds values other than 0 and 1 (unconditional?): "
                      "per-class results are skipped")
    return y.astype(np.int8), ""


def _select(n_file: int, indices, max_jets: int | None, rng: np.random.Generator, path: str) -> np.ndarray:
    if indices is None:
        indices = np.arange(n_file)
    else:
        indices = np.unique(np.asarray(indices, dtype=np.int64))
        if len(indices) and (indices[0] < 0 or indices[-1] >= n_file):
            raise JetFileError(
                f"jet indices run from {indices[0]} to {indices[-1]} but {path} holds {n_file} jets: "
                "does the split belong to a different file?"
            )
    if max_jets is not None and len(indices) > max_jets:
        # A random subset, not the first jets: files may be ordered by class.
        indices = np.sort(rng.choice(indices, size=max_jets, replace=False))
    return indices


def read_jets(
    path,
    indices=None,
    *,
    max_jets: int | None = None,
    thresholds=DEFAULT_THRESHOLDS,
    seed: int = 0,
    chunk_jets: int = DEFAULT_CHUNK_JETS,
    progress: bool = True,
    desc: str = "reading",
    keep_coarse: int = 0,
) -> JetSample:
    """Stream the selected jets of ``path`` (all, or sorted ``indices``) into a :class:`JetSample`.

    Reads whole HDF5 chunks in file order, so each compressed chunk is decoded once even
    when the selection is sparse; memory stays at about ``chunk_jets`` images. With
    ``keep_coarse`` it also keeps that many random jets summed over 5x5 pixels (one HCAL
    tower each), (m, 25, 25, 3), for the image classifier test.
    """
    import h5py
    from tqdm.auto import tqdm

    from jetfast.data.format import validate_jet_file

    path = os.fspath(path)
    n_file = validate_jet_file(path, keys=(IMAGE_KEY,))
    rng = np.random.default_rng(seed)
    with h5py.File(path, "r") as f:
        if "blocks_done" in f:  # jetfast generate's progress counter, removed when the file is finished
            raise JetFileError(
                f"{path} is an unfinished `jetfast generate` output: rerun the same generate command to finish it"
            )
        labels_file, label_note = _read_labels(f, path, n_file)
        selected = _select(n_file, indices, max_jets, rng, path)
        if len(selected) == 0:
            raise JetFileError(f"{path}: no jets to evaluate (the file or the selection is empty)")
        examples_wanted = set(rng.choice(selected, size=min(N_EXAMPLES, len(selected)), replace=False).tolist())
        coarse_wanted = np.sort(rng.choice(selected, size=min(keep_coarse, len(selected)), replace=False))
        coarse, coarse_labels = [], []
        ds = f[IMAGE_KEY]
        rows_per_chunk = ds.chunks[0] if ds.chunks else 1
        block = max(rows_per_chunk, (chunk_jets // rows_per_chunk) * rows_per_chunk)

        parts: dict[str, list] = {k: [] for k in OBSERVABLES}
        profiles, kept_labels, examples = [], [], []
        image_sum = {"all": np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3))}
        jets_per_key = {"all": 0}
        if labels_file is not None:
            for cls in CLASS_NAMES:
                image_sum[cls] = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3))
                jets_per_key[cls] = 0
        spectrum = np.zeros((3, len(SPECTRUM_EDGES) - 1), np.int64)
        n_nonfinite = n_negative = 0

        bar = tqdm(total=len(selected), desc=desc, unit="jet", disable=not progress, leave=False)
        for start in range(0, n_file, block):
            lo_sel, hi_sel = np.searchsorted(selected, [start, start + block])
            if lo_sel == hi_sel:
                continue
            rows = selected[lo_sel:hi_sel]
            images = ds[rows[0] : rows[-1] + 1]  # (n, 125, 125, 3)
            if len(images) != len(rows):  # a sparse selection: keep the selected jets only
                images = images[rows - rows[0]]
            with np.errstate(invalid="ignore"):  # NaN pixels give NaN observables; those jets are dropped
                obs = compute_observables(images, thresholds, with_profile=True)
            # A channel sum is finite exactly when all its pixels are: no second pass over the images.
            finite = np.isfinite(obs["tracks_sum"]) & np.isfinite(obs["ecal_sum"]) & np.isfinite(obs["hcal_sum"])
            if not finite.all():
                n_nonfinite += int((~finite).sum())
                images, rows = images[finite], rows[finite]
                obs = {k: v[finite] for k, v in obs.items()}
                if len(images) == 0:
                    bar.update(hi_sel - lo_sel)
                    continue
            n_negative += int((images < 0).any(axis=(1, 2, 3)).sum())
            for k in OBSERVABLES:
                parts[k].append(obs[k])
            profiles.append(obs["radial_profile"])
            # Mean images: one matrix product sums the chunk for all jets and for each class,
            # a single pass over the pixels instead of one masked copy per class.
            keys = list(image_sum)
            selectors = np.ones((len(keys), len(images)), np.float32)
            if labels_file is not None:
                y = labels_file[rows]
                kept_labels.append(y)
                for k, key in enumerate(keys[1:], start=1):
                    selectors[k] = y == key
            sums = selectors @ images.reshape(len(images), -1)  # (keys, 125*125*3)
            for k, key in enumerate(keys):
                image_sum[key] += sums[k].reshape(IMAGE_SIZE, IMAGE_SIZE, 3)
                jets_per_key[key] += int(selectors[k].sum())
            for c in range(3):
                pixels = images[..., c]
                pixels = pixels[pixels > 0]  # a few % of the pixels; uniform bins in log10 are fast
                spectrum[c] += np.histogram(np.log10(pixels), bins=len(SPECTRUM_EDGES) - 1,
                                            range=(np.log10(SPECTRUM_EDGES[0]), np.log10(SPECTRUM_EDGES[-1])))[0]
            for i, row in enumerate(rows):
                if int(row) in examples_wanted:
                    examples.append(images[i].copy())
            if len(coarse_wanted):
                mine = np.isin(rows, coarse_wanted)
                k = int(mine.sum())
                coarse.append(images[mine].reshape(k, 25, 5, 25, 5, 3).sum(axis=(2, 4)))
                if labels_file is not None:
                    coarse_labels.append(labels_file[rows[mine]])
            bar.update(hi_sel - lo_sel)
        bar.close()

    n_kept = sum(len(p) for p in profiles)
    if n_kept == 0:
        raise JetFileError(f"{path}: all {len(selected)} selected jets have NaN or inf pixels; nothing to evaluate")
    notes = [label_note] if label_note else []
    if n_nonfinite:
        notes.append(f"{path}: dropped {n_nonfinite} of {len(selected)} jets with NaN or inf pixels")
    if n_negative:
        notes.append(f"{path}: {n_negative} jets have negative pixels (kept; the data contract says pixels >= 0)")
    return JetSample(
        path=path,
        n_file=n_file,
        observables={k: np.concatenate(v) for k, v in parts.items()},
        profile=np.concatenate(profiles),
        labels=np.concatenate(kept_labels) if labels_file is not None else None,
        image_sum=image_sum,
        jets_per_key=jets_per_key,
        spectrum=spectrum,
        examples=np.stack(examples) if examples else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32),
        coarse=np.concatenate(coarse) if coarse else None,
        coarse_labels=np.concatenate(coarse_labels) if coarse_labels else None,
        n_nonfinite=n_nonfinite,
        n_negative=n_negative,
        label_note=label_note,
        notes=notes,
    )


# -- plots ---------------------------------------------------------------------------------------
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
    """Common bins over the central 99.8% of the pooled samples (tails land in the edge bins)."""
    pooled = np.concatenate([np.asarray(s, np.float64) for s in samples if len(s)])
    lo, hi = np.quantile(pooled, [0.001, 0.999])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    if np.allclose(pooled, np.round(pooled)) and hi - lo < 3 * n_bins:  # counts: one bin per integer
        return np.arange(math.floor(lo), math.ceil(hi) + 2) - 0.5
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
            centres = 0.5 * (bins[1:] + bins[:-1])
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = hg / hr
                ratio_err = ratio * np.hypot(eg / hg, er / hr)
            ax_ratio.errorbar(centres, ratio, yerr=ratio_err, fmt="o", ms=2.5, color="black", elinewidth=0.8)
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
        for j in range(len(names), rows * cols):
            axes[j // cols, j % cols].set_visible(False)
        fig.suptitle("Quark vs gluon jets: real (filled) and generated (lines)", y=0.995)
        fig.tight_layout()
        fig.savefig(path, dpi=90, bbox_inches="tight", pad_inches=0.1)
        plt.close(fig)
    return path


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
    centres = 0.5 * (PROFILE_EDGES[1:] + PROFILE_EDGES[:-1])
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
            ax.errorbar(centres, g.mean(0), yerr=g.std(0) / np.sqrt(len(g)), fmt="o", ms=3, color=color,
                        label=f"{label} generated")
            # The ratio only where real jets carry at least 0.1% of their pT: beyond, it is noise.
            shown = r.mean(0) > 1e-3
            ax_ratio.plot(centres[shown], g.mean(0)[shown] / r.mean(0)[shown], "o-", ms=3, color=color)
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


# -- the report ----------------------------------------------------------------------------------
def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _json_ready(obj):
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_ready(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None  # JSON has no NaN
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}g}"


def plus_minus(value, err) -> str:
    return _fmt(value) if err is None or not math.isfinite(err) else f"{_fmt(value)} ± {_fmt(err, 2)}"


def _distance_rows(table: dict) -> list[list[str]]:
    return [
        [name, plus_minus(d["w"], d["w_err"]), _fmt(d["w_norm"]), plus_minus(d["w_half"], d["w_half_err"]),
         plus_minus(d["floor"], d["floor_err"]), _fmt(d["ratio"], 2), _fmt(d["real_mean"]), _fmt(d["gen_mean"])]
        for name, d in table.items()
    ]


DISTANCE_HEADER = ["observable", "W(real, gen)", "W / σ_real", "W(half, gen)", "floor W(half, half)",
                   "ratio", "mean real", "mean gen"]


def _inline_html(text: str) -> str:
    """The two bits of Markdown the report uses (**bold**, `code`) as HTML."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _render(sections: list[dict], out_dir: Path, title: str) -> tuple[str, str]:
    """Markdown and self-contained HTML of the same sections (heading, text, table, images)."""
    md = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for sec in sections:
        md += [f"## {sec['heading']}", ""]
        body.append(f"<h2>{html.escape(sec['heading'])}</h2>")
        for para in sec.get("text", []):
            md += [para, ""]
            body.append(f"<p>{_inline_html(para)}</p>")
        if sec.get("table"):
            header, rows = sec["table"]
            md.append("| " + " | ".join(header) + " |")
            md.append("|" + "|".join(" --- " for _ in header) + "|")
            md += ["| " + " | ".join(row) + " |" for row in rows]
            md.append("")
            body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
            body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
            body.append("</table>")
        for image in sec.get("images", []):
            if image is None:
                continue
            rel = image.relative_to(out_dir).as_posix()
            md += [f"![{image.stem}]({rel})", ""]
            data = base64.b64encode(image.read_bytes()).decode()
            body.append(f'<p><img alt="{image.stem}" src="data:image/png;base64,{data}"></p>')
    css = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
           "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;"
           "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{css}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    return "\n".join(md) + "\n", page


def _c2st_verdict(auc: float, err: float) -> str:
    excess = abs(auc - 0.5) / err if err and math.isfinite(err) and err > 0 else float("inf")
    if excess < 2:
        return "consistent with 0.5: the classifier cannot tell generated from real jets"
    if auc < 0.6:
        return "slightly above 0.5: small but significant differences"
    if auc < 0.8:
        return "clearly above 0.5: the classifier separates real from generated jets"
    return "far above 0.5: generated jets are easy to tell from real ones"


def evaluate(
    real_path,
    gen_path,
    out_dir,
    *,
    real_indices=None,
    max_jets: int | None = None,
    thresholds=DEFAULT_THRESHOLDS,
    bootstrap: int = 50,
    seed: int = 0,
    plots: bool = True,
    progress: bool = True,
    chunk_jets: int = DEFAULT_CHUNK_JETS,
    real_note: str = "",
    cnn: bool = False,
) -> dict:
    """Compare generated jets with real ones; write report.md/html, metrics.json, plots/; return the metrics.

    ``real_indices`` selects real jets (e.g. a test split); ``max_jets`` caps each side with
    a random subset; ``thresholds`` are the pixel thresholds (GeV) of the multiplicities;
    ``cnn`` adds the image-level two-sample test (a small CNN, torch; slower).
    """
    from jetfast.evaluate.metrics import (
        TooFewJets, classifier_two_sample_test, cnn_two_sample_test, distance_table, features_matrix,
        quark_gluon_transfer,
    )

    t0 = time.perf_counter()
    if max_jets is not None and max_jets < 2:
        raise InvalidArgument(f"max_jets must be at least 2; got {max_jets}")
    if bootstrap < 0:
        raise InvalidArgument(f"bootstrap must be >= 0; got {bootstrap}")
    thresholds = tuple(float(t) for t in thresholds)
    if len(thresholds) != 3 or min(thresholds) < 0:
        raise InvalidArgument(f"thresholds must be 3 non-negative numbers (Tracks, ECAL, HCAL); got {thresholds}")
    out_dir = Path(out_dir)
    keep_coarse = 10_000 if cnn else 0
    real = read_jets(real_path, real_indices, max_jets=max_jets, thresholds=thresholds, seed=seed,
                     chunk_jets=chunk_jets, progress=progress, desc="real jets", keep_coarse=keep_coarse)
    gen = read_jets(gen_path, None, max_jets=max_jets, thresholds=thresholds, seed=seed + 1,
                    chunk_jets=chunk_jets, progress=progress, desc="generated jets", keep_coarse=keep_coarse)
    t_read = time.perf_counter() - t0

    metrics = {
        "real": {"path": os.path.abspath(real.path), "n_file": real.n_file, "n_used": real.n,
                 "n_nonfinite": real.n_nonfinite, "n_negative": real.n_negative, "selection": real_note or "all jets"},
        "gen": {"path": os.path.abspath(gen.path), "n_file": gen.n_file, "n_used": gen.n,
                "n_nonfinite": gen.n_nonfinite, "n_negative": gen.n_negative},
        "options": {"max_jets": max_jets, "thresholds_gev": dict(zip(CHANNELS, thresholds)), "bootstrap": bootstrap,
                    "seed": seed, "profile_edges": PROFILE_EDGES},
        "notes": real.notes + gen.notes,
    }
    metrics["distances"] = distance_table(real.observables, gen.observables, bootstrap=bootstrap, seed=seed)
    with_classes = real.labels is not None and gen.labels is not None
    metrics["distances_by_class"] = {}
    if with_classes:
        for cls, name in CLASS_NAMES.items():
            r_mask, g_mask = real.labels == cls, gen.labels == cls
            try:
                metrics["distances_by_class"][name] = distance_table(
                    {k: v[r_mask] for k, v in real.observables.items()},
                    {k: v[g_mask] for k, v in gen.observables.items()}, bootstrap=bootstrap, seed=seed)
            except TooFewJets as exc:
                metrics["notes"].append(f"{name} distances skipped: {exc}")

    ratios = {k: d["ratio"] for k, d in metrics["distances"].items() if d["ratio"] is not None}
    worst = max(ratios, key=ratios.get) if ratios else None
    metrics["summary"] = {
        "median_ratio": float(np.median(list(ratios.values()))) if ratios else None,
        "worst_observable": worst,
        "worst_ratio": ratios.get(worst),
    }

    metrics["radial_profile"] = {"edges": PROFILE_EDGES, "real_mean": real.profile.mean(0),
                                 "gen_mean": gen.profile.mean(0)}

    real_x, gen_x = features_matrix(real.observables), features_matrix(gen.observables)
    try:
        metrics["c2st"] = classifier_two_sample_test(real_x, gen_x, bootstrap=bootstrap, seed=seed)
    except TooFewJets as exc:
        metrics["c2st"] = {"skipped": str(exc)}
    if cnn:
        try:
            metrics["c2st_cnn"] = cnn_two_sample_test(real.coarse, gen.coarse, bootstrap=bootstrap, seed=seed)
        except TooFewJets as exc:
            metrics["c2st_cnn"] = {"skipped": str(exc)}
    if with_classes:
        try:
            metrics["quark_gluon"] = quark_gluon_transfer(real_x, real.labels, gen_x, gen.labels,
                                                          bootstrap=bootstrap, seed=seed)
        except TooFewJets as exc:
            metrics["quark_gluon"] = {"skipped": str(exc)}
    else:
        metrics["quark_gluon"] = {"skipped": "needs labels y in both files"}

    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    images: dict[str, Path | None] = {}
    t_plots = time.perf_counter()
    if plots:
        images["observables"] = plot_observables(real, gen, plot_dir / "observables.png")
        if with_classes:
            images["classes"] = plot_classes(real, gen, plot_dir / "classes.png")
        images["radial_profile"] = plot_radial_profile(real, gen, plot_dir / "radial_profile.png")
        images["pixel_spectrum"] = plot_pixel_spectrum(real, gen, plot_dir / "pixel_spectrum.png")
        images["mean_images"] = plot_mean_images(real, gen, plot_dir / "mean_images.png")
        images["jets_real"] = plot_jets(real, plot_dir / "jets_real.png", "real")
        images["jets_generated"] = plot_jets(gen, plot_dir / "jets_generated.png", "generated")
    metrics["plots"] = {k: v.relative_to(out_dir).as_posix() for k, v in images.items() if v is not None}
    metrics["timing_s"] = {"read": t_read, "plots": time.perf_counter() - t_plots, "total": time.perf_counter() - t0}

    sections = _report_sections(metrics, images)
    md, page = _render(sections, out_dir, "jetfast evaluation: generated vs real jets")
    _atomic_write(out_dir / "metrics.json", json.dumps(_json_ready(metrics), indent=2) + "\n")
    _atomic_write(out_dir / "report.md", md)
    _atomic_write(out_dir / "report.html", page)
    return metrics


def _report_sections(m: dict, images: dict) -> list[dict]:
    real, gen = m["real"], m["gen"]
    thresholds = ", ".join(f"{k} {v:g}" for k, v in m["options"]["thresholds_gev"].items())
    summary = [
        f"Real: `{real['path']}` — {real['n_used']} jets ({real['selection']}).",
        f"Generated: `{gen['path']}` — {gen['n_used']} jets.",
        f"Pixel thresholds for multiplicities (GeV): {thresholds}. Bootstrap replicas: {m['options']['bootstrap']}.",
    ] + [f"Note: {n}" for n in m["notes"]]
    sections = [{"heading": "Samples", "text": summary}]

    c2st = m["c2st"]
    if "skipped" in c2st:
        c2st_text = [f"Skipped: {c2st['skipped']}"]
    else:
        c2st_text = [
            f"ROC AUC = **{plus_minus(c2st['auc'], c2st['auc_err'])}** ({c2st['n_per_side']} jets per side, "
            f"{c2st['folds']}-fold out-of-fold scores; per-fold AUCs "
            f"{', '.join(_fmt(a) for a in c2st['fold_aucs'])}) — {_c2st_verdict(c2st['auc'], c2st['auc_err'])}.",
            "A gradient-boosted classifier is trained to tell real from generated jets using the observables "
            "below; 0.5 means it cannot, 1.0 means it always can.",
        ]
    cnn = m.get("c2st_cnn")
    if cnn is not None and "skipped" in cnn:
        c2st_text.append(f"Image CNN test skipped: {cnn['skipped']}")
    elif cnn is not None:
        c2st_text.append(
            f"Image-level test: a small CNN on 25x25 tower-summed images ({cnn['n_per_side']} jets per side, "
            f"{cnn['n_test']} held out) reaches ROC AUC = **{plus_minus(cnn['auc'], cnn['auc_err'])}** — "
            f"{_c2st_verdict(cnn['auc'], cnn['auc_err'])}."
        )
    sections.append({"heading": "Classifier two-sample test", "text": c2st_text})

    qg = m["quark_gluon"]
    if "skipped" in qg:
        qg_text = [f"Skipped: {qg['skipped']}"]
    else:
        qg_text = [
            f"Quark/gluon AUC on held-out real jets: **{plus_minus(qg['auc_real'], qg['auc_real_err'])}**; "
            f"on generated jets (labelled with the class asked for): **{plus_minus(qg['auc_gen'], qg['auc_gen_err'])}**.",
            f"The classifier is trained on {qg['n_train']} real jets. Similar AUCs mean the generated jets "
            "carry the class information of real ones; a lower generated AUC means the classes were washed out.",
        ]
    sections.append({"heading": "Quark/gluon classifier trained on real jets", "text": qg_text})

    explain = (
        "W is the 1-D Wasserstein distance (units of the observable) with its bootstrap error; W/σ_real divides "
        "it by the real standard deviation to compare observables. The noise floor is W between two disjoint "
        "random halves of the real jets; W(half, gen) compares one of these halves with as many generated jets "
        "as the other half holds, so ratio = W(half, gen) / floor is fair: about 1 for a perfect generator, "
        "larger is worse. Expect ratio fluctuations of order ±50% for a single observable."
    )
    summary = m["summary"]
    headline = (
        f"Median distance / noise floor over the observables: **{_fmt(summary['median_ratio'], 2)}** "
        f"(1 = as close as two real samples); farthest: `{summary['worst_observable']}` "
        f"at {_fmt(summary['worst_ratio'], 2)}."
    ) if summary["median_ratio"] is not None else "No noise floor could be measured."
    sections.append({"heading": "Observables: distances and noise floor", "text": [headline, explain],
                     "table": (DISTANCE_HEADER, _distance_rows(m["distances"])),
                     "images": [images.get("observables")]})
    for name, table in m["distances_by_class"].items():
        sections.append({"heading": f"Observables: {name} jets only", "table": (DISTANCE_HEADER, _distance_rows(table)),
                         })
    if images:
        sections.append({"heading": "Plots", "images": [images.get(k) for k in (
            "classes", "radial_profile", "pixel_spectrum", "mean_images", "jets_real", "jets_generated")]})
    return sections
