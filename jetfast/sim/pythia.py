"""Quark and gluon jets from Pythia 8: events, FastJet clustering, parton labels.

One :class:`JetSource` is one Pythia instance (pp at 13 TeV, hadronisation and
multi-parton interactions on) that produces jets of one flavor only:

* quark jets from ``HardQCD:qq2qq`` and ``HardQCD:qqbar2qqbarNew``;
* gluon jets from ``HardQCD:gg2gg`` and ``HardQCD:qqbar2gg``.

Jets are anti-kT R = 0.4 on the visible final state (no neutrinos). Of each event
the two leading jets are candidates; a candidate is kept when it lies in the pT
window and |eta| < eta_max and one outgoing hard parton (|status| = 23) of the
requested flavor lies within Delta R < 0.4 of it. Unmatched or wrong-flavor
jets are dropped, so every label is the flavor of the parton that made the jet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np
import pythia8mc

from jetfast.errors import InvalidArgument

QUARK_PROCESSES = ("HardQCD:qq2qq", "HardQCD:qqbar2qqbarNew")
GLUON_PROCESSES = ("HardQCD:gg2gg", "HardQCD:qqbar2gg")
JET_RADIUS = 0.4
MATCH_RADIUS = 0.4
JETS_PER_EVENT = 2
NEUTRINOS = (12, 14, 16)
# Jets carry less pT than their parton (radiation out of the cone) and pT-hat-max
# only trims the falling tail, so it can sit a little above pt_max.
PTHAT_MAX_FRACTION = 1.25
# Particles more than this beyond eta_max can neither belong to an R = 0.4 jet with
# |eta| < eta_max nor fall in its image (half-width 62.5 cells * 0.0174 = 1.09).
PARTICLE_ETA_MARGIN = 1.1


@dataclasses.dataclass(frozen=True)
class JetSelection:
    """Which jets are kept: pT window in GeV and |eta| < eta_max of the jet axis.

    ``pthat_min_fraction`` sets Pythia's pT-hat-min to that fraction of pt_min. Most
    events near pT-hat-min make no jet above pt_min, so a higher fraction is faster,
    but it drops the jets that come out harder than their parton (underlying event,
    ISR), gluon jets more than quark jets. Measured at the default window (jets lost
    at the low edge, quark / gluon; kept jets per event):
    0.7: <1% / <1%, 0.20 / 0.15;  0.8: 4% / 8%, 0.30 / 0.25;  0.9: 11% / 15%, 0.44 / 0.37.
    """

    pt_min: float = 70.0
    pt_max: float = 200.0
    eta_max: float = 1.4
    pthat_min_fraction: float = 0.7

    def __post_init__(self):
        if not (np.isfinite(self.pt_min) and np.isfinite(self.pt_max)) or not 0 < self.pt_min < self.pt_max:
            raise InvalidArgument(f"need 0 < pt_min < pt_max (GeV); got pt_min={self.pt_min}, pt_max={self.pt_max}")
        if self.pt_max > 6500:
            raise InvalidArgument(f"pt_max={self.pt_max} GeV is beyond the 6.5 TeV beam energy")
        if not 0 < self.eta_max <= 2.5:
            raise InvalidArgument(f"eta_max must be in (0, 2.5] (the tracker acceptance); got {self.eta_max}")
        if not 0 < self.pthat_min_fraction <= 1:
            raise InvalidArgument(f"pthat_min_fraction must be in (0, 1]; got {self.pthat_min_fraction}")


@dataclasses.dataclass
class Particles:
    """Visible final-state particles of one event, one array per quantity."""

    pt: np.ndarray
    eta: np.ndarray
    phi: np.ndarray
    e: np.ndarray
    pdgid: np.ndarray
    charge: np.ndarray

    def __len__(self):
        return len(self.pt)


@dataclasses.dataclass
class Jets:
    """Jets of one event, leading first."""

    pt: np.ndarray
    eta: np.ndarray
    phi: np.ndarray
    mass: np.ndarray

    def __len__(self):
        return len(self.pt)


def pythia_settings(quark: bool, selection: JetSelection) -> list[str]:
    """Pythia settings for a quark-only or gluon-only jet sample."""
    processes = QUARK_PROCESSES if quark else GLUON_PROCESSES
    return [
        "Beams:eCM = 13000.",
        *(f"{name} = on" for name in processes),
        f"PhaseSpace:pTHatMin = {selection.pthat_min_fraction * selection.pt_min:.6g}",
        f"PhaseSpace:pTHatMax = {PTHAT_MAX_FRACTION * selection.pt_max:.6g}",
        "PartonLevel:MPI = on",
        "PartonLevel:ISR = on",
        "PartonLevel:FSR = on",
        "HadronLevel:all = on",
        "HadronLevel:Decay = on",
        # Particles with c*tau > 10 mm (K0S, Lambda, ...) reach the detector before
        # decaying, as in the CMS convention for stable generator particles.
        "ParticleDecays:limitTau0 = on",
        "ParticleDecays:tau0Max = 10.",
        # Photon radiation off quarks and leptons barely changes a QCD jet's image
        # and costs shower time.
        "TimeShower:QEDshowerByQ = off",
        "TimeShower:QEDshowerByL = off",
        "SpaceShower:QEDshowerByQ = off",
        "SpaceShower:QEDshowerByL = off",
        # The event-record consistency check is a debugging aid.
        "Check:event = off",
        "Next:numberCount = 0",
        "Next:numberShowEvent = 0",
        "Next:numberShowProcess = 0",
        "Next:numberShowInfo = 0",
        "Print:quiet = on",
        # The seed used by init(); every block of jets reseeds with its own seed.
        "Random:setSeed = on",
        "Random:seed = 1",
    ]


def pythia_seed(seed_sequence: np.random.SeedSequence) -> int:
    """A Pythia seed (1 ... 900,000,000) from a NumPy seed sequence."""
    return int(seed_sequence.generate_state(1, np.uint64)[0] % 900_000_000) + 1


class CentralPartonVeto(pythia8mc.UserHooks):
    """Drop an event right after the hard process when no outgoing parton is central.

    A kept jet lies within Delta R < 0.4 of its parton, so with no parton at
    |eta| < eta_max + 0.4 no jet of the event can be kept. The veto is exact (the
    accepted jets are distributed as without it) and saves the showers, MPI and
    hadronisation of ~15% of the events.
    """

    def __init__(self, eta_limit: float):
        pythia8mc.UserHooks.__init__(self)
        self.eta_limit = eta_limit

    def canVetoProcessLevel(self):
        return True

    def doVetoProcessLevel(self, process):
        for i in range(process.size()):
            parton = process[i]
            if parton.status() == 23 and abs(parton.eta()) < self.eta_limit:
                return False
        return True


class JetSource:
    """One initialised Pythia instance making events of one flavour."""

    def __init__(self, quark: bool, selection: JetSelection):
        self.quark = quark
        self.selection = selection
        self.settings = pythia_settings(quark, selection)
        self.pythia = pythia8mc.Pythia("", False)
        # Held here: Pythia keeps only a raw pointer to the hook.
        self._veto = CentralPartonVeto(selection.eta_max + MATCH_RADIUS)
        self.pythia.setUserHooksPtr(self._veto)
        for line in self.settings:
            if not self.pythia.readString(line):
                raise RuntimeError(f"Pythia rejected the setting {line!r}")
        if not self.pythia.init():
            raise RuntimeError(f"Pythia failed to initialise with settings {self.settings}")
        self._jet_definition = None

    def reseed(self, seed: int) -> None:
        """Restart the random stream: the events that follow depend on ``seed`` only."""
        self.pythia.rndm.init(int(seed))

    def next_event(self) -> bool:
        return bool(self.pythia.next())

    def particles(self, eta_max: float = np.inf) -> Particles:
        return final_particles(self.pythia.event, eta_max)

    def partons(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return hard_partons(self.pythia.event)


def final_particles(event, eta_max: float = np.inf) -> Particles:
    """Visible final-state particles with |eta| < ``eta_max`` of a Pythia event record.

    Reading the record costs about as much as clustering it, so the loop makes as
    few calls into Pythia as it can: the eta cut comes before the other getters.
    """
    rows = []
    for p in event.particles():
        if p.isFinal():
            eta = p.eta()
            if -eta_max < eta < eta_max:
                rows.append((p.pT(), eta, p.phi(), p.e(), p.id(), p.charge()))
    table = np.array(rows, dtype=np.float64).reshape(-1, 6)
    pdgid = table[:, 4].astype(np.int32)
    visible = ~np.isin(np.abs(pdgid), NEUTRINOS)
    return Particles(
        pt=table[visible, 0],
        eta=table[visible, 1],
        phi=table[visible, 2],
        e=table[visible, 3],
        pdgid=pdgid[visible],
        charge=table[visible, 5].astype(np.float32),
    )


def hard_partons(event) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pdgid, eta, phi) of the outgoing partons of the hard process (|status| = 23)."""
    rows = []
    # The hard process sits at the top of the record, before the showers.
    for i in range(min(event.size(), 12)):
        p = event[i]
        if abs(p.status()) == 23:
            rows.append((p.id(), p.eta(), p.phi()))
    table = np.array(rows, dtype=np.float64).reshape(-1, 3)
    return table[:, 0].astype(np.int32), table[:, 1], table[:, 2]


@contextlib.contextmanager
def _quiet_stdout():
    """Silence C++ writes to stdout (FastJet prints its banner on first use)."""
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


_banner_shown = False


def cluster_jets(particles: Particles, radius: float = JET_RADIUS, pt_min: float = 5.0) -> Jets:
    """Anti-kT jets above ``pt_min`` (GeV) made of the particles, leading first.

    Uses FastJet's classic ``ClusterSequence`` on a list of ``PseudoJet``: for the
    ~250 central particles of an event this takes ~0.6 ms, where the awkward-array
    entry point takes ~1.4 ms (its fixed cost dominates at this size).
    """
    global _banner_shown
    import fastjet

    px = (particles.pt * np.cos(particles.phi)).tolist()
    py = (particles.pt * np.sin(particles.phi)).tolist()
    pz = (particles.pt * np.sinh(particles.eta)).tolist()
    inputs = [fastjet.PseudoJet(*p) for p in zip(px, py, pz, particles.e.tolist())]
    definition = fastjet.JetDefinition(fastjet.antikt_algorithm, radius)
    with contextlib.nullcontext() if _banner_shown else _quiet_stdout():
        sequence = fastjet.ClusterSequence(inputs, definition)
        _banner_shown = True
    jets = fastjet.sorted_by_pt(sequence.inclusive_jets(pt_min))
    table = np.array([(j.pt(), j.eta(), j.phi_std(), max(j.m2(), 0.0)) for j in jets], np.float64).reshape(-1, 4)
    return Jets(pt=table[:, 0], eta=table[:, 1], phi=table[:, 2], mass=np.sqrt(table[:, 3]))


def delta_r(eta1, phi1, eta2, phi2):
    dphi = np.mod(np.asarray(phi1) - phi2 + np.pi, 2.0 * np.pi) - np.pi
    return np.hypot(np.asarray(eta1) - eta2, dphi)


def is_quark(pdgid) -> np.ndarray:
    return (np.abs(pdgid) >= 1) & (np.abs(pdgid) <= 6)


def select_jets(jets: Jets, partons, quark: bool, selection: JetSelection) -> np.ndarray:
    """Indices of the leading jets that pass the window and match a parton of the flavour.

    Each jet takes its nearest hard parton within MATCH_RADIUS; a parton labels at
    most one jet. A jet whose nearest parton has the other flavor is dropped.
    """
    parton_id, parton_eta, parton_phi = partons
    kept = []
    used = set()
    for j in range(min(len(jets), JETS_PER_EVENT)):
        if not (selection.pt_min <= jets.pt[j] < selection.pt_max and abs(jets.eta[j]) < selection.eta_max):
            continue
        if len(parton_id) == 0:
            continue
        distance = delta_r(jets.eta[j], jets.phi[j], parton_eta, parton_phi)
        nearest = int(np.argmin(distance))
        if distance[nearest] >= MATCH_RADIUS or nearest in used:
            continue
        flavor_is_quark = bool(is_quark(parton_id[nearest]))
        if parton_id[nearest] != 21 and not flavor_is_quark:
            continue
        if flavor_is_quark != quark:
            continue
        used.add(nearest)
        kept.append(j)
    return np.asarray(kept, dtype=np.int64)


def versions() -> dict:
    """Versions of the generator libraries, for file attributes."""
    import fastjet

    import jetfast

    try:
        from importlib.metadata import version

        pythia_version = version("pythia8mc")
    except Exception:  # metadata missing in odd installs
        pythia_version = "unknown"
    return {"jetfast": jetfast.__version__, "pythia8mc": pythia_version, "fastjet": fastjet.__version__}
