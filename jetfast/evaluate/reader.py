"""Streaming a jet file into what the report needs: per-jet observables and running sums.

:func:`read_jets` reads whole HDF5 chunks in file order (each compressed chunk decoded
once, memory bounded by ``chunk_jets`` images) and gathers a :class:`JetSample`: the
observables of every selected jet (:func:`jetfast.evaluate.observables.compute_observables`,
the same for real and generated jets), mean images, the pixel spectrum and a few example
jets. Jets with NaN or inf pixels are dropped and counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import h5py
import numpy as np
from tqdm.auto import tqdm

from jetfast.data.format import CLASS_NAMES, IMAGE_KEY, IMAGE_SIZE, LABEL_KEY, validate_jet_file
from jetfast.errors import JetFileError
from jetfast.evaluate.observables import DEFAULT_THRESHOLDS, OBSERVABLES, compute_observables

SPECTRUM_EDGES = np.logspace(-6, 3, 91)  # pixel values (GeV) of the pixel-intensity spectrum
N_EXAMPLES = 4  # jets drawn in each example grid
DEFAULT_CHUNK_JETS = 512  # ~100 MB of images per chunk


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
