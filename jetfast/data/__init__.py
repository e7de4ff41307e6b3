"""Jet data: the file format contract, the intensity transform, the Pythia
generator with its detector model, and the fast loader."""

from jetfast.data.format import CHANNELS, IMAGE_SIZE, MODEL_SIZE, validate_jet_file
from jetfast.data.transforms import IntensityTransform, pad_to_model, crop_to_image
from jetfast.data.loader import JetLoader, JetReadError

__all__ = [
    "CHANNELS",
    "IMAGE_SIZE",
    "MODEL_SIZE",
    "IntensityTransform",
    "JetLoader",
    "JetReadError",
    "crop_to_image",
    "pad_to_model",
    "validate_jet_file",
]
