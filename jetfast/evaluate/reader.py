"""Streaming a jet file into what the report needs: per-jet observables and running sums.

:func:`read_jets` reads whole HDF5 chunks in file order (each compressed chunk decoded
once, memory bounded by ``chunk_jets`` images) and gathers a :class:`JetSample`: the
observables of every selected jet (:func:`jetfast.evaluate.observables.compute_observables`,
the same for real and generated jets), mean images, the pixel spectrum and a few example
jets. Every jet passes the check of the data contract the loader's batches pass
(:func:`jetfast.data.format.check_jets`): a file with a NaN, infinite, negative or absurdly
large pixel is refused, naming the jets, and so is a chunk HDF5 cannot read.

Beside the images a file may hold per-jet kinematics (:data:`KINEMATIC_KEYS`): ``pt`` and
``m0``, in real (simulated) files the generator-level jet before the detector, in generated
files computed from the image; and ``pt_gen`` and ``m0_gen``, the generator-level values a
conditional generator was asked for, each present only when it was asked for. The sample
keeps those the file has, for the selected jets; their values are not checked here (a NaN
or a non-positive pT only leaves that jet out of what needs it, see :mod:`.response`), their
shape is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

import h5py
import numpy as np
from tqdm.auto import tqdm

from jetfast.data.format import (CLASS_NAMES, IMAGE_KEY, IMAGE_SIZE, LABEL_KEY, REQUESTED_KEYS, check_jets, read_images,
                                 validate_jet_file)
from jetfast.errors import JetFileError
from jetfast.evaluate.observables import DEFAULT_THRESHOLDS, OBSERVABLES, compute_observables

SPECTRUM_EDGES = np.logspace(-6, 3, 91)  # pixel values (GeV) of the pixel-intensity spectrum
N_EXAMPLES = 4  # jets drawn in each example grid
DEFAULT_CHUNK_JETS = 512  # ~100 MB of images per chunk
KINEMATIC_KEYS = ("pt", "m0", *REQUESTED_KEYS)  # per-jet scalars in GeV, each (N,) when present


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
    ids: np.ndarray | None = None  # (N,) which jets these are: rows of the file, or numbers 0..n-1
    coarse: np.ndarray | None = None  # (m, 25, 25, 3) 5x5-summed images of random jets, for the CNN test
    coarse_labels: np.ndarray | None = None
    label_note: str = ""
    notes: list = field(default_factory=list)
    scalars: dict[str, np.ndarray] = field(default_factory=dict)  # KINEMATIC_KEYS of the file -> (N,), like ids

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


def _read_kinematics(f, path: str, n: int) -> dict[str, np.ndarray]:
    found = {}
    for key in KINEMATIC_KEYS:
        if key not in f:
            continue
        ds = f[key]
        if not isinstance(ds, h5py.Dataset) or ds.shape != (n,) or ds.dtype.kind not in "fiu":
            what = f"has shape {ds.shape} and dtype {ds.dtype}" if isinstance(ds, h5py.Dataset) else "is a group"
            raise JetFileError(f"{path}:{key} {what}; expected ({n},) numbers, one per jet of {IMAGE_KEY}")
        found[key] = np.asarray(ds[...], np.float64)
    return found


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


class _SampleBuilder:
    """Accumulates batches of jets (images in GeV, their ids, their labels) into a :class:`JetSample`."""

    def __init__(self, path: str, ids, *, labelled: bool, thresholds, rng: np.random.Generator, keep_coarse: int):
        self.path = path
        ids = np.asarray(ids)
        self.thresholds = thresholds
        self.examples_wanted = set(rng.choice(ids, size=min(N_EXAMPLES, len(ids)), replace=False).tolist())
        self.coarse_wanted = np.sort(rng.choice(ids, size=min(keep_coarse, len(ids)), replace=False))
        self.labelled = labelled
        self.parts: dict[str, list] = {k: [] for k in OBSERVABLES}
        self.profiles, self.labels, self.ids, self.examples, self.coarse, self.coarse_labels = [], [], [], [], [], []
        self.image_sum = {"all": np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3))}
        self.jets_per_key = {"all": 0}
        if labelled:
            for cls in CLASS_NAMES:
                self.image_sum[cls] = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3))
                self.jets_per_key[cls] = 0
        self.spectrum = np.zeros((3, len(SPECTRUM_EDGES) - 1), np.int64)

    def add(self, images: np.ndarray, ids: np.ndarray, labels: np.ndarray | None) -> None:
        check_jets(images, ids, self.path)
        obs = compute_observables(images, self.thresholds, with_profile=True)
        for k in OBSERVABLES:
            self.parts[k].append(obs[k])
        self.profiles.append(obs["radial_profile"])
        self.ids.append(np.asarray(ids, np.int64))
        # Mean images: one matrix product sums the batch for all jets and for each class,
        # a single pass over the pixels instead of one masked copy per class.
        keys = list(self.image_sum)
        selectors = np.ones((len(keys), len(images)), np.float32)
        if self.labelled:
            self.labels.append(labels)
            for k, key in enumerate(keys[1:], start=1):
                selectors[k] = labels == key
        sums = selectors @ images.reshape(len(images), -1)  # (keys, 125*125*3)
        for k, key in enumerate(keys):
            self.image_sum[key] += sums[k].reshape(IMAGE_SIZE, IMAGE_SIZE, 3)
            self.jets_per_key[key] += int(selectors[k].sum())
        for c in range(3):
            pixels = images[..., c]
            pixels = pixels[pixels > 0]  # a few % of the pixels; uniform bins in log10 are fast
            self.spectrum[c] += np.histogram(np.log10(pixels), bins=len(SPECTRUM_EDGES) - 1,
                                             range=(np.log10(SPECTRUM_EDGES[0]), np.log10(SPECTRUM_EDGES[-1])))[0]
        for i, jet in enumerate(ids):
            if int(jet) in self.examples_wanted:
                self.examples.append(images[i].copy())
        if len(self.coarse_wanted):
            mine = np.isin(ids, self.coarse_wanted)
            k = int(mine.sum())
            self.coarse.append(images[mine].reshape(k, 25, 5, 25, 5, 3).sum(axis=(2, 4)))
            if self.labelled:
                self.coarse_labels.append(labels[mine])

    def finish(self, n_file: int, label_note: str = "", scalars_file: dict | None = None) -> JetSample:
        ids = np.concatenate(self.ids)
        return JetSample(
            path=self.path,
            n_file=n_file,
            observables={k: np.concatenate(v) for k, v in self.parts.items()},
            profile=np.concatenate(self.profiles),
            labels=np.concatenate(self.labels) if self.labelled else None,
            image_sum=self.image_sum,
            jets_per_key=self.jets_per_key,
            spectrum=self.spectrum,
            examples=np.stack(self.examples) if self.examples else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32),
            ids=ids,
            coarse=np.concatenate(self.coarse) if self.coarse else None,
            coarse_labels=np.concatenate(self.coarse_labels) if self.coarse_labels else None,
            label_note=label_note,
            notes=[label_note] if label_note else [],
            scalars={key: values[ids] for key, values in (scalars_file or {}).items()},
        )


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
        scalars_file = _read_kinematics(f, path, n_file)
        selected = _select(n_file, indices, max_jets, rng, path)
        if len(selected) == 0:
            raise JetFileError(f"{path}: no jets to evaluate (the file or the selection is empty)")
        builder = _SampleBuilder(path, selected, labelled=labels_file is not None, thresholds=thresholds, rng=rng,
                                 keep_coarse=keep_coarse)
        ds = f[IMAGE_KEY]
        rows_per_chunk = ds.chunks[0] if ds.chunks else 1
        block = max(rows_per_chunk, (chunk_jets // rows_per_chunk) * rows_per_chunk)
        with tqdm(total=len(selected), desc=desc, unit="jet", disable=not progress, leave=False) as bar:
            for start in range(0, n_file, block):
                lo_sel, hi_sel = np.searchsorted(selected, [start, start + block])
                if lo_sel == hi_sel:
                    continue
                rows = selected[lo_sel:hi_sel]
                images = read_images(ds, rows[0], rows[-1] + 1, path)  # (n, 125, 125, 3)
                if len(images) != len(rows):  # a sparse selection: keep the selected jets only
                    images = images[rows - rows[0]]
                builder.add(images, rows, labels_file[rows] if labels_file is not None else None)
                bar.update(hi_sel - lo_sel)
    return builder.finish(n_file, label_note, scalars_file)


def collect_jets(batches: Iterable, n: int, *, name: str, labelled: bool, thresholds=DEFAULT_THRESHOLDS,
                 seed: int = 0, progress: bool = True, desc: str = "jets") -> JetSample:
    """The :class:`JetSample` of ``n`` jets made on the fly: ``batches`` yields (images (B, 125,
    125, 3) float32 GeV, labels (B,) or None), ``n`` jets in all; ``name`` stands for the file path.
    Such jets come with no kinematics of their own: ``scalars`` is empty."""
    builder = _SampleBuilder(name, np.arange(n), labelled=labelled, thresholds=thresholds,
                             rng=np.random.default_rng(seed), keep_coarse=0)
    done = 0
    with tqdm(total=n, desc=desc, unit="jet", disable=not progress, leave=False) as bar:
        for images, labels in batches:
            builder.add(np.asarray(images, np.float32), np.arange(done, done + len(images)),
                        np.asarray(labels, np.int8) if labelled else None)
            done += len(images)
            bar.update(len(images))
    if done != n:
        raise ValueError(f"{name}: expected {n} jets, got {done}")
    return builder.finish(n)
