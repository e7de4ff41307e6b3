"""The data contract: the layout of the ML4SCI quark/gluon jet-image file.

| key      | shape          | dtype   | meaning                                   |
| -------- | -------------- | ------- | ----------------------------------------- |
| X_jets   | (N,125,125,3)  | float32 | channels last: [Tracks, ECAL, HCAL], GeV  |
| y        | (N,)           | float32 | class label; jetfast writes 1=quark, 0=gluon |
| pt       | (N,)           | float32 | jet transverse momentum, GeV              |
| m0       | (N,)           | float32 | jet mass, GeV                             |

Files jetfast generates use exactly this layout, so anything that reads the real
file reads ours.
"""

from __future__ import annotations

import os

from jetfast.errors import JetFileError

CHANNELS = ("Tracks", "ECAL", "HCAL")
IMAGE_SIZE = 125  # pixels per side in files
MODEL_SIZE = 128  # pixels per side in model tensors (padded, lossless)
IMAGE_KEY = "X_jets"
LABEL_KEY = "y"
SCALAR_KEYS = ("y", "pt", "m0")
QUARK, GLUON = 1, 0
CLASS_NAMES = {QUARK: "quark", GLUON: "gluon"}  # label y -> name, in files jetfast writes


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
        for key in keys:
            if key == IMAGE_KEY:
                continue
            if key not in f:
                raise JetFileError(f"{path} has no dataset {key!r} (keys: {sorted(f.keys())})")
            if f[key].shape[:1] != (n,):
                raise JetFileError(f"{path}:{key} has shape {f[key].shape}; expected ({n}, ...) to match {IMAGE_KEY}")
        return n
