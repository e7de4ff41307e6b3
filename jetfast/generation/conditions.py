"""What each generated jet is asked to be: its class and, for a Transformer conditioned on
them, its generator-level pT and mass.

Three ways to ask, combinable:

* ``cls``: all quark, all gluon, a 50/50 random mix, or unconditional;
* ``pt`` / ``mass``: one value in GeV for every jet, or a range ``(lo, hi)`` from which each
  jet's value is drawn uniformly (a flat spectrum, to see how the detector responds);
* ``like``: a jet file (or a split of a run's jet file) whose jets are mirrored one to one:
  jet i of the output is asked for the class ``y``, pT ``pt`` and mass ``m0`` of its jet i.

Draws depend only on the block's seed, so a block is the same when it is made again.
What was asked is written beside the jets as ``pt_gen`` and ``m0_gen``.
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

    def check(self, n: int, model) -> None:
        """Refuse what the model cannot do before anything is written: a kinematic request to a
        class-only model, values outside the training range (unless the caller allows it), too
        few --like jets."""
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
        kinematic_requests(model, len(pt if pt is not None else mass), pt, mass, self.allow_extrapolation)

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
