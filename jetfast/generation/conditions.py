"""What each generated jet is asked to be: its class and, for a Transformer conditioned on
them, its generator-level pT and mass.

Three ways to ask, combinable:

* ``cls``: all quark, all gluon, a 50/50 random mix, or unconditional;
* ``pt`` / ``mass``: one value in GeV for every jet, or a range ``(lo, hi)`` from which each
  jet's value is drawn uniformly (a flat spectrum, to see how the detector responds);
* ``like``: a jet file (or a split of a run's jet file) whose jets are mirrored one to one:
  jet i of the output is asked for the class ``y``, pT ``pt`` and mass ``m0`` of its jet i.

A VAE conditioned on the jets decodes every jet for a whole generator-level jet (class, pT
and mass): what was not asked is drawn from the VAE's training jets (:func:`complete`), so
that an unconditional request gives jets like the training jets, and ``--pt 150`` gives jets
of the masses that 150 GeV jets have.

Draws depend only on the block's seed, so a block is the same when it is made again.
What each jet was made for is written beside it as ``pt_gen`` and ``m0_gen``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import numpy as np
import torch

from jetfast.data.format import GLUON, QUARK, REQUESTED_KEYS, validate_jet_file
from jetfast.errors import InvalidArgument, JetFileError

CLASS_CHOICES = ("quark", "gluon", "mix", "unconditional")
_RANGE_STREAM = 1  # the draws of ranges; the class mix draws from the block seed itself
_COMPLETE_STREAM = 2  # the training jets drawn to complete a request
NEIGHBOURS = 16  # a missing mass (pT) comes from one of the training jets this close in pT (mass)


def parse_value_or_range(text: str, name: str):
    """``"150"`` -> 150.0; ``"100:200"`` -> (100.0, 200.0), for ``--pt`` and ``--mass``."""
    parts = text.split(":")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise InvalidArgument(f"{name} takes a value in GeV or a range LO:HI; got {text!r}") from None
    if len(values) == 1:
        return values[0]
    if len(values) != 2 or not values[0] < values[1]:
        raise InvalidArgument(f"{name} takes a value in GeV or a range LO:HI with LO < HI; got {text!r}")
    return tuple(values)


@dataclass
class LikeJets:
    """The jets of a file to mirror: their class (None if the file has no usable ``y``), pT and mass."""

    path: str
    rows: np.ndarray
    labels: np.ndarray | None
    pt: np.ndarray
    mass: np.ndarray

    @classmethod
    def read(cls, path, rows=None) -> "LikeJets":
        path = os.fspath(path)
        n_file = validate_jet_file(path, keys=("pt", "m0"))
        rows = np.arange(n_file) if rows is None else np.sort(np.asarray(rows, np.int64))
        if len(rows) and (rows[0] < 0 or rows[-1] >= n_file):
            raise JetFileError(f"{path} holds {n_file} jets; the selection runs to row {rows[-1]}: "
                               "does the split belong to another file?")
        with h5py.File(path, "r") as f:
            pt, mass = f["pt"][...][rows].astype(np.float64), f["m0"][...][rows].astype(np.float64)
            labels = f["y"][...][rows] if "y" in f and f["y"].shape == (n_file,) else None
        if labels is not None and not np.isin(labels, (QUARK, GLUON)).all():
            labels = None  # e.g. -1 of unconditional generation: the class is then --cls's
        bad = ~np.isfinite(pt) | (pt <= 0) | ~np.isfinite(mass) | (mass < 0)
        if bad.any():
            raise JetFileError(f"{path}: jet {int(rows[np.argmax(bad)])} has pt {pt[np.argmax(bad)]} and m0 "
                               f"{mass[np.argmax(bad)]}; --like needs finite pt > 0 and m0 >= 0 GeV")
        return cls(path, rows, None if labels is None else labels.astype(np.int64), pt, mass)


@dataclass
class Conditions:
    """Per-jet requests for ``n`` jets; :meth:`block` gives those of jets [start, stop)."""

    cls: str | None = None  # None: the class of the --like jets, else a 50/50 mix
    pt: float | tuple[float, float] | None = None
    mass: float | tuple[float, float] | None = None
    like: LikeJets | None = None
    like_offset: int = 0  # this process's first jet among the --like jets
    allow_extrapolation: bool = False  # requests outside the training jets' range

    def __post_init__(self):
        if self.cls is not None and self.cls not in CLASS_CHOICES:
            raise InvalidArgument(f"cls must be one of {CLASS_CHOICES}; got {self.cls!r}")
        if self.like is not None and (self.pt is not None or self.mass is not None):
            raise InvalidArgument("--like takes each jet's pT and mass from its file: drop --pt and --mass")
        for name, value in (("pt", self.pt), ("mass", self.mass)):
            if isinstance(value, tuple) and (len(value) != 2 or not value[0] < value[1]):
                raise InvalidArgument(f"{name}: a range needs LO < HI; got {value}")

    @property
    def kinematic(self) -> bool:
        return self.like is not None or self.pt is not None or self.mass is not None

    @property
    def written(self) -> tuple[str, ...]:
        """The datasets of requested values the output gets."""
        if self.like is not None:
            return REQUESTED_KEYS
        return tuple(key for key, value in zip(REQUESTED_KEYS, (self.pt, self.mass)) if value is not None)

    def written_for(self, conditioned: bool) -> tuple[str, ...]:
        """The datasets of requested values the output gets; a VAE conditioned on the jets makes
        every jet for a pT and mass, asked or drawn."""
        return REQUESTED_KEYS if conditioned else self.written

    def check(self, n: int, model, ranges=None) -> None:
        """Refuse what the model cannot do before anything is written: a kinematic request to a
        class-only model, values outside the training range (the Transformer's, or ``ranges`` of a
        VAE conditioned on the jets, when the Transformer is class-only; unless the caller allows
        it), too few --like jets."""
        from jetfast.generation.sampler import kinematic_requests

        if self.like is not None and self.like_offset + n > len(self.like.rows):
            raise InvalidArgument(f"--like {self.like.path} has {len(self.like.rows)} jets to mirror; asked for "
                                  f"{self.like_offset + n}")
        if not self.kinematic:
            return
        if self.like is not None:
            rows = slice(self.like_offset, self.like_offset + n)
            pt, mass = self.like.pt[rows], self.like.mass[rows]
        else:
            # A range is inside the training range when both of its ends are.
            pt, mass = (None if v is None else np.broadcast_to(np.asarray(v, np.float64), 2) for v in (self.pt, self.mass))
        if model.config.kinematic:
            ranges = None  # the Transformer's own
        kinematic_requests(model, len(pt if pt is not None else mass), pt, mass, self.allow_extrapolation, ranges)

    def block(self, start: int, stop: int, seed: int) -> tuple[torch.Tensor, np.ndarray | None, np.ndarray | None]:
        """(class labels (B,) int64, -1 = unconditional; requested pT (B,) or None; mass (B,) or None)."""
        count = stop - start
        like = None if self.like is None else slice(self.like_offset + start, self.like_offset + stop)
        if self.cls is None and like is not None and self.like.labels is not None:
            labels = torch.from_numpy(self.like.labels[like].copy())
        else:
            labels = _class_labels(self.cls or "mix", count, seed)
        if like is not None:
            return labels, self.like.pt[like].copy(), self.like.mass[like].copy()
        rng = np.random.default_rng([seed, _RANGE_STREAM])
        pt, mass = (None if value is None else
                    rng.uniform(*value, size=count) if isinstance(value, tuple) else np.full(count, float(value))
                    for value in (self.pt, self.mass))
        return labels, pt, mass


def training_ranges(training_jets: torch.Tensor) -> np.ndarray:
    """((pt lo, hi), (mass lo, hi)) in GeV of the training jets (N, 3) (y, pt, m0)."""
    jets = training_jets.double().numpy()
    return np.array([[jets[:, 1].min(), jets[:, 1].max()], [jets[:, 2].min(), jets[:, 2].max()]])


def complete(training_jets: torch.Tensor, labels: torch.Tensor, pt, mass, seed: int):
    """Whole generator-level jets for a block: (labels (B,) int64, pt (B,), mass (B,)) in GeV.

    What is given is kept; the rest is drawn from the training jets (N, 3) (y, pt, m0) of the
    jet's class: a jet of no class (-1) takes a random training jet's class; with neither pT nor
    mass, a random training jet's; with pT only, the mass-to-pT ratio of one of the
    :data:`NEIGHBOURS` training jets nearest in pT; with mass only, the pT of one of those
    nearest in mass. Draws depend on ``seed`` only.
    """
    table = training_jets.double().numpy()
    rng = np.random.default_rng([seed, _COMPLETE_STREAM])
    count = len(labels)
    labels = labels.numpy().astype(np.int64).copy()
    pt = np.full(count, np.nan) if pt is None else np.asarray(pt, np.float64).copy()
    mass = np.full(count, np.nan) if mass is None else np.asarray(mass, np.float64).copy()
    free = labels < 0
    labels[free] = table[rng.integers(0, len(table), int(free.sum())), 0].round().astype(np.int64)
    for label in np.unique(labels):
        jets = labels == label
        rows = table[np.isclose(table[:, 0], label)]
        rows = rows if len(rows) else table
        near = min(NEIGHBOURS, len(rows))
        offsets = rng.integers(-(near // 2), near - near // 2, size=int(jets.sum()))
        random_row = rows[rng.integers(0, len(rows), size=int(jets.sum()))]

        def nearest(column: int, values: np.ndarray) -> np.ndarray:
            order = np.argsort(rows[:, column], kind="stable")
            at = np.searchsorted(rows[order, column], np.nan_to_num(values))
            return rows[order[np.clip(at + offsets, 0, len(rows) - 1)]]

        jet_pt, jet_mass = pt[jets], mass[jets]
        has_pt, has_mass = np.isfinite(jet_pt), np.isfinite(jet_mass)
        by_pt, by_mass = nearest(1, jet_pt), nearest(2, jet_mass)
        jet_mass = np.where(has_mass, jet_mass, np.where(has_pt, by_pt[:, 2] / by_pt[:, 1] * jet_pt, random_row[:, 2]))
        jet_pt = np.where(has_pt, jet_pt, np.where(has_mass, by_mass[:, 1], random_row[:, 1]))
        pt[jets], mass[jets] = jet_pt, jet_mass
    return torch.from_numpy(labels), pt, mass


def _class_labels(cls: str, count: int, seed: int) -> torch.Tensor:
    """All quark, all gluon, a balanced random mix, or -1 (unconditional)."""
    if cls == "quark":
        return torch.full((count,), QUARK, dtype=torch.int64)
    if cls == "gluon":
        return torch.full((count,), GLUON, dtype=torch.int64)
    if cls == "unconditional":
        return torch.full((count,), -1, dtype=torch.int64)
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 2, size=count)).to(torch.int64)
