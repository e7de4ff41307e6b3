"""Jet data: the file format contract (:mod:`.format`), the intensity transform
(:mod:`.transforms`), the fast loader (:mod:`.loader`), and the Pythia generator with its
detector model.

Attributes that need torch are imported on first use, so that ``jetfast.data.format``
(and the command line's ``--help``) stay light.
"""

_LAZY = {
    "CHANNELS": "jetfast.data.format",
    "IMAGE_SIZE": "jetfast.data.format",
    "MODEL_SIZE": "jetfast.data.format",
    "validate_jet_file": "jetfast.data.format",
    "IntensityTransform": "jetfast.data.transforms",
    "crop_to_image": "jetfast.data.transforms",
    "pad_to_model": "jetfast.data.transforms",
    "JetLoader": "jetfast.data.loader",
    "JetReadError": "jetfast.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jetfast.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
