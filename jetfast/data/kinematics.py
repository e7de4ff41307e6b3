"""Jet kinematics from an image, the same way for real and generated jets.

Pixels are treated as massless four-vectors at the cell centres in (eta, phi)
relative to the jet axis, with the pixel value as its transverse momentum (the
calorimeter channels hold transverse energy in GeV). Jet pT and mass are
invariant under a longitudinal boost and a rotation about the beam, so these
relative coordinates give the same pT and mass as absolute ones.

By default the calorimeter channels (ECAL + HCAL) are summed: charged hadrons
deposit in the calorimeters too, so adding Tracks would count them twice.
"""

from __future__ import annotations

import numpy as np

from jetfast.data.format import IMAGE_SIZE

CELL_SIZE = 0.0174  # (eta, phi) width of one pixel, as in the CMS ECAL barrel
CALORIMETER_CHANNELS = (1, 2)


def cell_centers(size: int = IMAGE_SIZE, cell: float = CELL_SIZE) -> np.ndarray:
    """Cell-centre coordinates relative to the jet axis (the central pixel)."""
    return (np.arange(size, dtype=np.float64) - (size - 1) / 2.0) * cell


def jet_pt_mass(images: np.ndarray, channels=CALORIMETER_CHANNELS, cell: float = CELL_SIZE):
    """Return (pt, mass) float32 arrays for images (N, H, W, 3) in GeV, channels last."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected images of shape (N, H, H, 3); got {images.shape}")
    et = images[..., list(channels)].sum(-1, dtype=np.float64)  # (N, H, W)
    coords = cell_centers(images.shape[1], cell)
    eta = coords[:, None]  # rows are eta
    phi = coords[None, :]  # columns are phi
    px = np.einsum("nij,ij->n", et, np.broadcast_to(np.cos(phi), et.shape[1:]))
    py = np.einsum("nij,ij->n", et, np.broadcast_to(np.sin(phi), et.shape[1:]))
    pz = np.einsum("nij,ij->n", et, np.broadcast_to(np.sinh(eta), et.shape[1:]))
    energy = np.einsum("nij,ij->n", et, np.broadcast_to(np.cosh(eta), et.shape[1:]))
    pt = np.hypot(px, py)
    mass2 = energy**2 - px**2 - py**2 - pz**2
    mass = np.sqrt(np.clip(mass2, 0.0, None))
    return pt.astype(np.float32), mass.astype(np.float32)
