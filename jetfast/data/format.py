"""The data contract: the layout of the ML4SCI quark/gluon jet-image file.

| key      | shape          | dtype   | meaning                                   |
| -------- | -------------- | ------- | ----------------------------------------- |
| X_jets   | (N,125,125,3)  | float32 | channels last: [Tracks, ECAL, HCAL], GeV  |
| y        | (N,)           | float32 | class label; jetfast writes 1=quark, 0=gluon |
| pt       | (N,)           | float32 | jet transverse momentum, GeV              |
| m0       | (N,)           | float32 | jet mass, GeV                             |

Files jetfast generates use exactly this layout, so anything that reads the real
file reads ours. What ``pt`` and ``m0`` mean differs in one respect: in a simulated (or
real) file they are the generator-level jet, the FastJet jet before the detector; in a
generated file, the pT and mass computed from the generated image. A generated file
asked for given jets (``jetfast generate --like/--pt/--mass``) carries what was asked
beside them:

| key      | shape | dtype   | meaning                                                  |
| -------- | ----- | ------- | -------------------------------------------------------- |
| pt_gen   | (N,)  | float32 | generator-level jet pT the jet was asked for, GeV        |
| m0_gen   | (N,)  | float32 | generator-level jet mass the jet was asked for, GeV      |

each present only when that value was asked for.

Every pixel is finite, >= 0 and at most :data:`MAX_PIXEL_GEV`. Whatever reads jets
from a file (the loader, on both backends, and the evaluation's reader) passes them
through :func:`check_jets`, which refuses the jets that break this, naming the file and
the jets; :func:`read_images` names them when HDF5 cannot read a chunk at all.
"""

from __future__ import annotations

import os

from jetfast.errors import JetFileError, JetReadError

CHANNELS = ("Tracks", "ECAL", "HCAL")
IMAGE_SIZE = 125  # pixels per side in files
MODEL_SIZE = 128  # pixels per side in model tensors (padded, lossless)
IMAGE_KEY = "X_jets"
LABEL_KEY = "y"
SCALAR_KEYS = ("y", "pt", "m0")
REQUESTED_KEYS = ("pt_gen", "m0_gen")  # in generated files: the generator-level pT and mass asked for
QUARK, GLUON = 1, 0
CLASS_NAMES = {QUARK: "quark", GLUON: "gluon"}  # label y -> name, in files jetfast writes
# The largest pixel value a jet can hold, in GeV: 100 TeV is more than the whole 13 TeV
# collision (the largest pixel of the real file is ~760 GeV), so a larger value is damage.
MAX_PIXEL_GEV = 1e5


def validate_jet_file(path: str | os.PathLike, keys=(IMAGE_KEY, LABEL_KEY)) -> int:
    """Check that ``path`` is a jet file with the requested keys; return N.

    Raises :class:`FileNotFoundError` or :class:`JetFileError` with a message that
    says what was found instead.
    """
    import h5py

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"jet file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise JetFileError(f"{path} is not a readable HDF5 file ({exc})") from exc
    with f:
        if IMAGE_KEY not in f:
            raise JetFileError(f"{path} has no dataset {IMAGE_KEY!r} (keys: {sorted(f.keys())})")
        ds = f[IMAGE_KEY]
        if ds.ndim != 4 or ds.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, len(CHANNELS)):
            raise JetFileError(
                f"{path}:{IMAGE_KEY} has shape {ds.shape}; expected (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), "
                "channels last in the order [Tracks, ECAL, HCAL]"
            )
        n = ds.shape[0]
        if IMAGE_KEY in keys:
            _check_filters(ds, path)
        for key in keys:
            if key == IMAGE_KEY:
                continue
            if key not in f:
                raise JetFileError(f"{path} has no dataset {key!r} (keys: {sorted(f.keys())})")
            if f[key].shape[:1] != (n,):
                raise JetFileError(f"{path}:{key} has shape {f[key].shape}; expected ({n}, ...) to match {IMAGE_KEY}")
        return n


def _check_filters(ds, path: str) -> None:
    import h5py

    plist = ds.id.get_create_plist()
    for i in range(plist.get_nfilters()):
        filter_id, _, _, name = plist.get_filter(i)
        if not h5py.h5z.filter_avail(filter_id):
            raise JetFileError(
                f"{path}:{IMAGE_KEY} uses HDF5 filter {filter_id} ({name.decode(errors='replace')}), "
                "which neither jetfast's reader nor h5py can decode; install the filter plugin "
                "(e.g. `pip install hdf5plugin` and import it) or rewrite the file with lzf/gzip"
            )


def read_images(ds, start: int, stop: int, path: str):
    """``ds[start:stop]`` of an open ``X_jets`` dataset; a chunk HDF5 cannot decode (damaged,
    truncated) is a :class:`JetReadError` that names the file and the jets."""
    try:
        return ds[start:stop]
    except OSError as exc:
        error = exc
    rows = ds.chunks[0] if ds.chunks else stop - start
    for first in range(start - start % rows, stop, rows):  # name the chunk that fails, not the whole block
        try:
            ds[max(first, start) : min(first + rows, stop)]
        except OSError:
            start, stop = max(first, start), min(first + rows, stop)
            break
    chunk = f" (chunk {start // rows})" if ds.chunks else ""
    raise JetReadError(f"{path}: cannot read {IMAGE_KEY} jets {start}..{stop - 1}{chunk}: {error}; the file is "
                       "damaged or truncated: restore it from its source") from error


def check_jets(images, jets, path: str, lower=0.0, upper=MAX_PIXEL_GEV) -> None:
    """Refuse jets whose pixels break the contract: NaN or infinite, negative, or above
    :data:`MAX_PIXEL_GEV`. Raises :class:`JetFileError` naming ``path`` and the bad ``jets``.

    ``images`` (n, 125, 125, 3) or (n, 3, H, W), a NumPy array or a CPU tensor, in GeV, and
    ``jets`` their numbers (file rows). For images already passed through a per-channel
    monotone transform, ``lower`` and ``upper`` are instead the transformed bounds, one per
    channel, and the images (n, 3, H, W).
    """
    import numpy as np

    pixels = np.asarray(images)
    per_channel = np.ndim(lower) > 0 or np.ndim(upper) > 0
    flat = pixels.reshape(len(pixels), len(CHANNELS), -1) if per_channel else pixels.reshape(len(pixels), -1)
    # One min and one max per jet (per channel): NaN reaches both, so this is all it takes.
    low, high = flat.min(axis=-1), flat.max(axis=-1)
    nonfinite = ~(np.isfinite(low) & np.isfinite(high))
    negative = low < np.asarray(lower, low.dtype)
    above = high > np.asarray(upper, high.dtype)
    if per_channel:
        nonfinite, negative, above = nonfinite.any(axis=1), negative.any(axis=1), above.any(axis=1)
    if not (nonfinite | negative | above).any():
        return
    jets = np.asarray(jets)
    found = []
    for bad, what in ((nonfinite, "NaN or infinite pixels"), (negative & ~nonfinite, "negative pixels"),
                      (above & ~nonfinite, f"pixels above {MAX_PIXEL_GEV:g} GeV")):
        if bad.any():
            shown = ", ".join(str(jet) for jet in jets[bad][:10])
            found.append(f"jet(s) {shown}{f' ... ({bad.sum()} jets)' if bad.sum() > 10 else ''} have {what}")
    raise JetFileError(f"{path}: {'; '.join(found)}. Pixels must be finite and within [0, {MAX_PIXEL_GEV:g}] GeV: "
                       "the file is damaged or was written wrong; restore it from its source, or leave these jets out")
