"""A simple CMS-like detector that turns generator particles into a jet image.

The image is a 125 x 125 grid of 0.0174 x 0.0174 cells in (eta, phi), the size of a
CMS ECAL barrel crystal, centred on the jet axis: the axis falls in the central
pixel (62, 62), rows are eta and columns are phi (as in ``kinematics.py``). A
particle deposits in the cell that contains its (eta, phi) relative to the axis,
with phi differences wrapped to [-pi, pi). Channels, in GeV, float32, never negative:

* **Tracks**: pT of charged particles with pT above ``track_pt_min`` inside the
  tracker (|eta| < 2.5), smeared with sigma(pT)/pT = 0.7% (+) 0.015% * pT, which is
  roughly the CMS silicon tracker. Muons leave a track and nothing else.
* **ECAL**: transverse energy of photons and electrons. Each particle's energy is
  smeared with sigma(E)/E = 3%/sqrt(E) (+) 0.5% and then converted to E_T = E/cosh(eta).
  Every crystal adds Gaussian electronic noise (40 MeV, as in the CMS barrel), and
  cells whose energy is below ``ecal_threshold`` (100 MeV, 2.5 sigma) are
  zero-suppressed, so ~0.6% of the cells hold a noise hit, as in real data.
* **HCAL**: transverse energy of hadrons, charged and neutral, summed in 5 x 5-cell
  towers aligned to the image grid (125 = 25 towers of 5). The tower energy is
  smeared with sigma(E)/E = 100%/sqrt(E) (+) 5%, gets 250 MeV of noise, towers
  below ``hcal_threshold`` (1 GeV) are zero-suppressed, and each tower's E_T is
  divided by 25 and copied to its 25 cells, exactly as in the CMS Open Data file,
  so HCAL is constant on 5 x 5 blocks.

What is left out, on purpose: the magnetic field (charged particles hit the
calorimeters where their track points), the hadrons' share of energy in the ECAL,
and pile-up. Neutrinos are invisible. Noise is converted to E_T at the cell (or
tower) centre. Deposits that smearing would make negative are clipped to zero.
``Detector(smear=False)`` turns off resolution and noise: exact deposits.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jetfast.data.format import IMAGE_SIZE
from jetfast.data.kinematics import CELL_SIZE

TRACKS, ECAL, HCAL = 0, 1, 2
TOWER = 5  # HCAL tower side in image cells
TRACKER_ETA = 2.5

_NEUTRINOS = (12, 14, 16)
_ELECTROMAGNETIC = (11, 22)
_MUON = 13


@dataclasses.dataclass(frozen=True)
class Detector:
    """Resolutions and thresholds of the detector model (energies in GeV)."""

    track_pt_min: float = 0.5
    track_resolution: tuple[float, float] = (0.007, 0.00015)  # (constant, per GeV of pT)
    ecal_resolution: tuple[float, float] = (0.03, 0.005)  # (stochastic, constant)
    ecal_noise: float = 0.04  # per crystal
    ecal_threshold: float = 0.1  # cell energy
    hcal_resolution: tuple[float, float] = (1.0, 0.05)  # (stochastic, constant)
    hcal_noise: float = 0.25  # per tower
    hcal_threshold: float = 1.0  # tower energy
    smear: bool = True  # False: no resolution, no noise, the exact deposits (for tests and studies)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def render(self, pt, eta, phi, e, pdgid, charge, jet_eta: float, jet_phi: float, rng=None) -> np.ndarray:
        """Return the (125, 125, 3) float32 image [Tracks, ECAL, HCAL] of one jet.

        ``pt, eta, phi, e, pdgid, charge`` are equal-length arrays of final-state
        particles (any particles outside the image are ignored); ``jet_eta, jet_phi``
        is the jet axis. ``rng`` (a ``numpy.random.Generator``) is needed when smearing.
        """
        pt, eta, phi, e = (np.asarray(a, dtype=np.float64) for a in (pt, eta, phi, e))
        pdgid = np.asarray(pdgid)
        charge = np.asarray(charge)
        if not (pt.shape == eta.shape == phi.shape == e.shape == pdgid.shape == charge.shape and pt.ndim == 1):
            raise ValueError(
                "particle arrays must be 1-D and of equal length; got shapes "
                f"pt {pt.shape}, eta {eta.shape}, phi {phi.shape}, e {e.shape}, pdgid {pdgid.shape}, charge {charge.shape}"
            )
        if self.smear and rng is None:
            raise ValueError("a smearing detector needs rng=numpy.random.default_rng(...)")

        size = IMAGE_SIZE
        half = size / 2.0
        dphi = np.mod(phi - jet_phi + np.pi, 2.0 * np.pi) - np.pi
        row = np.floor((eta - jet_eta) / CELL_SIZE + half)
        col = np.floor(dphi / CELL_SIZE + half)
        inside = (row >= 0) & (row < size) & (col >= 0) & (col < size) & np.isfinite(e)
        row, col = row[inside].astype(np.int64), col[inside].astype(np.int64)
        pt, eta, e, charge = pt[inside], eta[inside], e[inside], charge[inside]
        abs_id = np.abs(pdgid[inside])
        cell = row * size + col
        image = np.zeros((3, size * size), np.float64)

        # Tracks
        track = (charge != 0) & (pt > self.track_pt_min) & (np.abs(eta) < TRACKER_ETA)
        track_pt = pt[track]
        if self.smear and track_pt.size:
            constant, slope = self.track_resolution
            track_pt = track_pt * (1.0 + rng.standard_normal(track_pt.size) * np.hypot(constant, slope * track_pt))
        image[TRACKS] = _sum_by(cell[track], np.clip(track_pt, 0.0, None), size * size)

        calo = ~np.isin(abs_id, _NEUTRINOS + (_MUON,))
        em = calo & np.isin(abs_id, _ELECTROMAGNETIC)
        hadron = calo & ~em

        # ECAL: smear each particle's energy, then threshold the cell energy.
        em_e = e[em]
        if self.smear and em_e.size:
            stochastic, constant = self.ecal_resolution
            sigma = np.hypot(stochastic / np.sqrt(np.maximum(em_e, 1e-9)), constant)
            em_e = np.clip(em_e * (1.0 + rng.standard_normal(em_e.size) * sigma), 0.0, None)
        ecal_e = _sum_by(cell[em], em_e, size * size)
        ecal_et = _sum_by(cell[em], em_e / np.cosh(eta[em]), size * size)
        row_eta = jet_eta + (np.arange(size) - (size - 1) / 2.0) * CELL_SIZE
        if self.smear and self.ecal_noise > 0:
            noise = rng.standard_normal(size * size) * self.ecal_noise
            ecal_e += noise
            ecal_et += noise / np.repeat(np.cosh(row_eta), size)
        image[ECAL] = np.where(ecal_e >= self.ecal_threshold, np.clip(ecal_et, 0.0, None), 0.0)

        # HCAL: sum hadrons into towers, smear the tower, threshold, spread E_T/25 over its cells.
        towers = size // TOWER
        tower = (row[hadron] // TOWER) * towers + col[hadron] // TOWER
        tower_e = _sum_by(tower, e[hadron], towers * towers)
        tower_et = _sum_by(tower, e[hadron] / np.cosh(eta[hadron]), towers * towers)
        if self.smear:
            lit = tower_e > 0
            stochastic, constant = self.hcal_resolution
            sigma = np.hypot(stochastic / np.sqrt(tower_e[lit]), constant)
            scale = np.clip(1.0 + rng.standard_normal(int(lit.sum())) * sigma, 0.0, None)
            tower_e[lit] *= scale
            tower_et[lit] *= scale
            if self.hcal_noise > 0:
                noise = rng.standard_normal(towers * towers) * self.hcal_noise
                tower_e += noise
                tower_et += noise / np.repeat(np.cosh(row_eta[TOWER // 2 :: TOWER]), towers)
        tower_et = np.where(tower_e >= self.hcal_threshold, np.clip(tower_et, 0.0, None), 0.0).reshape(towers, towers)
        image[HCAL] = towers_to_cells(tower_et).reshape(-1)

        return np.ascontiguousarray(image.reshape(3, size, size).transpose(1, 2, 0), dtype=np.float32)


def towers_to_cells(towers):
    """HCAL towers (..., 25, 25), E_T in GeV -> image cells (..., 125, 125) as the CMS Open Data
    file stores them: every cell of a 5 x 5 tower holds the tower's E_T / 25.

    NumPy arrays or torch tensors; the generator's decoder expands its towers with this too.
    """
    *lead, rows, cols = towers.shape
    cells = (towers / (TOWER * TOWER))[..., :, None, :, None]
    blocks = (*lead, rows, TOWER, cols, TOWER)
    cells = cells.expand(blocks) if hasattr(cells, "expand") else np.broadcast_to(cells, blocks)
    return cells.reshape(*lead, rows * TOWER, cols * TOWER)


def cells_to_towers(cells):
    """Image cells (..., 125, 125) -> HCAL towers (..., 25, 25): the sum of each 5 x 5 block, a
    tower's E_T (the inverse of :func:`towers_to_cells` on HCAL images). NumPy or torch."""
    *lead, rows, cols = cells.shape
    return cells.reshape(*lead, rows // TOWER, TOWER, cols // TOWER, TOWER).sum(axis=(-3, -1))


def _sum_by(index, weights, length):
    # float64 even when there is nothing to sum (bincount then returns int64)
    return np.bincount(index, weights, minlength=length).astype(np.float64, copy=False)


CMS_LIKE = Detector()


def render(pt, eta, phi, e, pdgid, charge, jet_eta: float, jet_phi: float, rng=None, detector: Detector = CMS_LIKE):
    """Image of one jet with ``detector`` (the CMS-like default); see :meth:`Detector.render`."""
    return detector.render(pt, eta, phi, e, pdgid, charge, jet_eta, jet_phi, rng=rng)
