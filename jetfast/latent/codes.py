"""The codes file: every jet of a run as latent codes, written by ``jetfast encode`` and
read by ``jetfast train-gpt``. HDF5 (default ``RUN_DIR/codes.h5``)::

    codes    (N, D) uint8    bin index per latent dimension (int16/int32 when K > 256)
    y        (N,)   float32  class label, as in the jet file (1 quark, 0 gluon)
    split    (N,)   uint8    0 train, 1 val, 2 test (the VAE run's split.npz)
    index    (N,)   int64    row of the jet in the jet file
    centers  (D, K) float32  the bin centers the codes index
    posterior_std (N, D) float16  the VAE posterior's width around each jet's latent (the codes are
                             its mean): ``train-gpt`` redraws the training codes from it
    pt, m0   (N,)   float32  the jet file's generator-level jet pT and mass (GeV), when it has them:
                             what the Transformer is conditioned on besides the class
    attrs    num_bins, latent_dim, run_dir, data, checkpoint, bins_method, split_values,
             jetfast_version

Rows are in file order. The file is written to ``*.tmp`` as batches arrive and renamed
into place only when every row is written.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import torch

from jetfast import ops
from jetfast.errors import CodesFileError
from jetfast.run import SPLITS

KINEMATICS = ("pt", "m0")  # per-jet values carried from the jet file, when it has them

# Split codes: the position in SPLITS ("train", "val", "test").
TRAIN, VAL, TEST = (SPLITS.index(name) for name in ("train", "val", "test"))
SPLIT_VALUES = ", ".join(f"{value} {name}" for value, name in enumerate(SPLITS))
_UNSPLIT = 255


def split_labels(split: dict, file_jets: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, split_of_row)``: the sorted jet indices of a run's split and the split code of each."""
    label = np.full(file_jets, _UNSPLIT, np.uint8)
    for value, name in enumerate(SPLITS):
        if name in split:
            label[split[name]] = value
    rows = np.flatnonzero(label != _UNSPLIT)
    return rows, label[rows]


class CodesWriter:
    """Writes a codes file batch by batch, in any order of rows::

        with CodesWriter(out, rows, split_of_row, centers, code_dtype, run_dir=..., data=...,
                         checkpoint=..., bins_method=...) as writer:
            for ...:
                writer.write(index, codes, y, posterior_std, pt=..., m0=...)

    The file appears at ``path`` when the block ends without an error and every row was
    written; otherwise nothing is left behind.
    """

    def __init__(self, path, rows: np.ndarray, split_of_row: np.ndarray, centers: np.ndarray, code_dtype,
                 kinematics: tuple[str, ...] = (), **attrs):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.rows = np.asarray(rows, np.int64)
        self.split_of_row = split_of_row
        self.centers = centers
        self.code_dtype = np.dtype(code_dtype)
        self.kinematics = tuple(kinematics)
        self.attrs = attrs
        self.written = 0
        self.handle = None

    def __enter__(self) -> "CodesWriter":
        import jetfast

        latent_dim, num_bins = self.centers.shape
        n = len(self.rows)
        self.handle = h5py.File(self.tmp, "w")
        self.codes = self.handle.create_dataset("codes", (n, latent_dim), dtype=self.code_dtype,
                                                chunks=(min(n, 4096), latent_dim))
        self.labels = self.handle.create_dataset("y", (n,), dtype=np.float32)
        self.scalars = {key: self.handle.create_dataset(key, (n,), dtype=np.float32) for key in self.kinematics}
        self.handle.create_dataset("split", data=self.split_of_row)
        self.handle.create_dataset("index", data=self.rows)
        self.handle.create_dataset("centers", data=self.centers)
        # float16 keeps three digits of a width, ample for drawing from it, at a quarter of float32's bytes.
        self.posterior_std = self.handle.create_dataset("posterior_std", (n, latent_dim), dtype=np.float16,
                                                        chunks=(min(n, 4096), latent_dim))
        self.handle.attrs.update({
            "num_bins": num_bins,
            "latent_dim": latent_dim,
            **self.attrs,
            "split_values": SPLIT_VALUES,
            "jetfast_version": jetfast.__version__,
        })
        return self

    def write(self, index: np.ndarray, codes: np.ndarray, labels: np.ndarray, posterior_std: np.ndarray,
              **scalars: np.ndarray) -> None:
        """Place the codes, labels, posterior widths and ``kinematics`` (keyword arrays) of the jets
        at file rows ``index`` (any order)."""
        if set(scalars) != set(self.kinematics):
            raise ValueError(f"CodesWriter.write: got {sorted(scalars)}; this file holds {list(self.kinematics)}")
        where = np.searchsorted(self.rows, index)
        order = np.argsort(where, kind="stable")
        where = where[order]
        columns = [(self.codes, codes[order]), (self.labels, labels[order].astype(np.float32)),
                   (self.posterior_std, np.asarray(posterior_std)[order].astype(np.float16))]
        columns += [(self.scalars[key], np.asarray(values)[order].astype(np.float32)) for key, values in scalars.items()]
        contiguous = len(where) and where[-1] - where[0] == len(where) - 1
        for dataset, values in columns:
            if contiguous:
                dataset[where[0] : where[-1] + 1] = values
            else:
                dataset[where] = values
        self.written += len(where)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.handle.close()
            if exc_type is None:
                if self.written != len(self.rows):
                    raise RuntimeError(f"encoded {self.written} jets but expected {len(self.rows)}")
                os.replace(self.tmp, self.path)
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


def draw_codes(codes: torch.Tensor, posterior_std: torch.Tensor, centers: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Codes (B, D) of latents drawn from the VAE posterior N(mu, std^2) of each jet, mu the center
    of its code: ``dequantize`` + ``std`` x N(0, 1), quantized again against ``centers`` (D, K).

    What a code Transformer trained on these learns is the distribution of the latents the VAE
    decoder was trained on (the aggregate posterior), not the sharper one of the posterior means:
    a jet's mean is one point of the region its image could have come from."""
    noise = torch.randn(codes.shape, generator=generator, dtype=torch.float32)
    latents = ops.dequantize(codes, centers) + posterior_std.float() * noise
    return ops.quantize(latents, centers, out_dtype=codes.dtype)


def read_codes(path) -> dict:
    """Load and check a codes file; return codes (N, D) uint8/int, labels, split, the attributes,
    and ``posterior_std`` (float32), ``pt``, ``m0``, ``index`` and ``data`` (the jet file the codes
    were encoded from) (None when the file has none)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"codes file not found: {path} (write it with `jetfast encode`, or pass --codes)")
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise CodesFileError(f"{path} is not a readable HDF5 file ({exc})") from exc
    with handle:
        missing = [key for key in ("codes", "y", "split") if key not in handle]
        if missing:
            raise CodesFileError(f"{path} lacks dataset(s) {missing}; a codes file holds codes, y, split (and index)")
        for attr in ("num_bins", "latent_dim"):
            if attr not in handle.attrs:
                raise CodesFileError(f"{path} lacks the attribute {attr!r} written by `jetfast encode`")
        codes = handle["codes"][...]
        labels = handle["y"][...]
        split = handle["split"][...]
        num_bins = int(handle.attrs["num_bins"])
        latent_dim = int(handle.attrs["latent_dim"])
        centers = handle["centers"][...].astype(np.float32) if "centers" in handle else None
        kinematics = {key: handle[key][...] for key in KINEMATICS if key in handle}
        posterior_std = handle["posterior_std"][...].astype(np.float32) if "posterior_std" in handle else None
        index = handle["index"][...] if "index" in handle else None
        data = str(handle.attrs["data"]) if "data" in handle.attrs else None
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise CodesFileError(f"{path}: codes must be an (N, D) integer array; got {codes.dtype} {codes.shape}")
    n, dims = codes.shape
    if dims != latent_dim:
        raise CodesFileError(f"{path}: codes have D={dims} columns but latent_dim={latent_dim}")
    if num_bins < 2:
        raise CodesFileError(f"{path}: num_bins={num_bins}; need at least 2 bins")
    if labels.shape != (n,) or split.shape != (n,):
        raise CodesFileError(f"{path}: y {labels.shape} and split {split.shape} must both be ({n},)")
    if n and (codes.min() < 0 or codes.max() >= num_bins):
        row = int(np.nonzero(((codes < 0) | (codes >= num_bins)).any(axis=1))[0][0])
        raise CodesFileError(
            f"{path}: codes outside the vocabulary [0, {num_bins}) (first at row {row}: "
            f"min {codes.min()}, max {codes.max()}); was the file written with another number of bins?"
        )
    if not np.all((labels == 0) | (labels == 1)):
        raise CodesFileError(f"{path}: y must be 1 (quark) or 0 (gluon); found {np.unique(labels)[:5]}")
    if not np.all(np.isin(split, (TRAIN, VAL, TEST))):
        raise CodesFileError(f"{path}: split must hold 0 (train), 1 (val) or 2 (test); found {np.unique(split)[:5]}")
    if centers is not None and centers.shape != (latent_dim, num_bins):
        raise CodesFileError(f"{path}: centers have shape {centers.shape}; expected ({latent_dim}, {num_bins})")
    if index is not None and index.shape != (n,):
        raise CodesFileError(f"{path}: index has shape {index.shape}; expected ({n},)")
    if posterior_std is not None:
        if posterior_std.shape != codes.shape:
            raise CodesFileError(f"{path}: posterior_std has shape {posterior_std.shape}; expected {codes.shape}")
        bad = ~np.isfinite(posterior_std) | (posterior_std < 0)
        if bad.any():
            row = int(np.nonzero(bad.any(axis=1))[0][0])
            raise CodesFileError(f"{path}: posterior_std must be finite and >= 0; row {row} is not "
                                 "(encode the jets again with `jetfast encode`)")
    for key, values in kinematics.items():
        if values.shape != (n,):
            raise CodesFileError(f"{path}: {key} has shape {values.shape}; expected ({n},)")
        bad = ~np.isfinite(values) | (values < 0) | ((values == 0) if key == "pt" else False)
        if bad.any():
            raise CodesFileError(f"{path}: {key} must be finite and positive (mass: >= 0); row {int(np.argmax(bad))} "
                                 f"holds {values[np.argmax(bad)]}")
    return {"codes": codes, "labels": labels.astype(np.int64), "split": split, "num_bins": num_bins,
            "latent_dim": latent_dim, "centers": centers, "posterior_std": posterior_std, "path": str(path.resolve()),
            "index": index, "data": data,
            **{key: kinematics.get(key) for key in KINEMATICS}}
