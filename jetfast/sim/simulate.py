"""Simulate a quark/gluon jet-image file with Pythia 8 and the detector model.

The N jets are cut into work units of ``UNIT_JETS`` jets. The class of every jet
is fixed up front (a seeded shuffle of round(N * quark_fraction) quarks and the
rest gluons), and each unit reseeds Pythia and the detector from (seed, unit), so
the file depends on the seed and N only, not on how many workers ran. Worker
processes (started with 'spawn': no HDF5 handle is ever inherited) keep one
initialised Pythia per flavor and simulate units; the parent writes the units in
order as they arrive, whole chunks at a time, into ``FILE.tmp-<pid>`` and renames
it to ``FILE`` only when every jet is in. A failed or interrupted run leaves no
file under the final name.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import signal
import threading

import numpy as np

from jetfast.sim.detector import CMS_LIKE, Detector
from jetfast.data.format import IMAGE_KEY, IMAGE_SIZE, QUARK
from jetfast.errors import InvalidArgument
from jetfast.run import check_output_file
from jetfast.sim.pythia import (
    PARTICLE_ETA_MARGIN,
    JetSelection,
    JetSource,
    cluster_jets,
    pythia_seed,
    pythia_settings,
    select_jets,
    versions,
)

UNIT_JETS = 16  # jets per work unit; part of what the seed means, so fixed
COMPRESSIONS = ("lzf", "gzip", "none")
# Events without a single accepted jet after which the pT/eta window is called a mistake.
EFFICIENCY_PROBE = 2000


def generate_jets(
    n: int,
    out,
    *,
    quark_fraction: float = 0.5,
    seed: int = 0,
    workers: int | None = None,
    compression: str = "lzf",
    pt_min: float = 70.0,
    pt_max: float = 200.0,
    eta_max: float = 1.4,
    pthat_min_fraction: float = 0.7,
    chunk: int = 32,
    overwrite: bool = False,
    detector: Detector = CMS_LIKE,
    progress: bool = True,
) -> pathlib.Path:
    """Write ``n`` simulated jets to the HDF5 file ``out`` in the ML4SCI layout; return its path.

    ``X_jets`` (n,125,125,3) float32 [Tracks, ECAL, HCAL] in GeV, ``y`` (1 = quark,
    0 = gluon), ``pt`` and ``m0`` (FastJet jet pT and mass, GeV), and attributes with
    every generator setting, the library versions and the seed. ``pthat_min_fraction``
    trades a few low-pT jets for speed (see :class:`jetfast.sim.pythia.JetSelection`).
    """
    out = pathlib.Path(out)
    selection = JetSelection(
        pt_min=float(pt_min), pt_max=float(pt_max), eta_max=float(eta_max), pthat_min_fraction=float(pthat_min_fraction)
    )
    _check_arguments(n, out, quark_fraction, seed, workers, compression, chunk, overwrite)
    workers = min(workers or os.cpu_count() or 1, math.ceil(n / UNIT_JETS))

    labels = class_labels(n, quark_fraction, seed)
    units = [
        (index, seed, labels[start : start + UNIT_JETS], selection, detector)
        for index, start in enumerate(range(0, n, UNIT_JETS))
    ]
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        attrs = _file_attributes(n, seed, quark_fraction, selection, detector, compression)
        _write_file(tmp, units, labels, attrs, compression, chunk, workers, progress)
        os.replace(tmp, out)
    finally:
        # Reached with the temporary file still there only when the run failed.
        if tmp.exists():
            tmp.unlink()
    return out


def class_labels(n: int, quark_fraction: float, seed: int) -> np.ndarray:
    """round(n * quark_fraction) quarks (1) and the rest gluons (0), shuffled by the seed."""
    n_quark = int(round(n * quark_fraction))
    labels = np.zeros(n, np.float32)
    labels[:n_quark] = QUARK
    np.random.default_rng(np.random.SeedSequence([seed, 0x9E3779B9])).shuffle(labels)
    return labels


def _check_arguments(n, out, quark_fraction, seed, workers, compression, chunk, overwrite):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise InvalidArgument(f"n must be a positive number of jets; got {n!r}")
    if not (isinstance(quark_fraction, (int, float)) and 0.0 <= quark_fraction <= 1.0):
        raise InvalidArgument(f"quark_fraction must be in [0, 1]; got {quark_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidArgument(f"seed must be a non-negative integer; got {seed!r}")
    if workers is not None and (not isinstance(workers, (int, np.integer)) or workers < 1):
        raise InvalidArgument(f"workers must be a positive integer (or None for all cores); got {workers!r}")
    if compression not in COMPRESSIONS:
        raise InvalidArgument(f"compression must be one of {COMPRESSIONS}; got {compression!r}")
    if not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise InvalidArgument(f"chunk must be a positive number of jets per HDF5 chunk; got {chunk!r}")
    check_output_file(out, overwrite)


def _file_attributes(n, seed, quark_fraction, selection: JetSelection, detector: Detector, compression) -> dict:
    """Everything needed to know how the file was made (and to make it again)."""
    return {
        "generator": "jetfast data generate (Pythia 8 + FastJet + CMS-like detector model)",
        "n": n,
        "seed": seed,
        "quark_fraction": quark_fraction,
        "label_convention": "y = 1 quark, y = 0 gluon (flavour of the matched hard parton)",
        "pt_min": selection.pt_min,
        "pt_max": selection.pt_max,
        "eta_max": selection.eta_max,
        "pthat_min_fraction": selection.pthat_min_fraction,
        "jet_algorithm": "anti-kT R = 0.4 on visible final-state particles (FastJet)",
        "parton_matching": "outgoing hard parton (|status| = 23) within Delta R < 0.4",
        "pythia_settings_quark": json.dumps(pythia_settings(True, selection)),
        "pythia_settings_gluon": json.dumps(pythia_settings(False, selection)),
        "detector": json.dumps(detector.to_dict()),
        "units": "GeV; pixels are pT (Tracks) and E_T (ECAL, HCAL) in (eta, phi) cells of 0.0174",
        "work_unit_jets": UNIT_JETS,
        "compression": compression,
        **{f"version_{name}": value for name, value in versions().items()},
    }


def _write_file(tmp, units, labels, attrs, compression, chunk, workers, progress):
    import h5py
    from tqdm.auto import tqdm

    n = len(labels)
    chunk = min(chunk, n)
    if compression == "none":
        layout = {}
    else:
        layout = {"chunks": (chunk, IMAGE_SIZE, IMAGE_SIZE, 3), "compression": compression}
        if compression == "gzip":
            layout["shuffle"] = True
    keys = ("X_jets", "y", "pt", "m0")
    with h5py.File(tmp, "w") as f:
        datasets = {IMAGE_KEY: f.create_dataset(IMAGE_KEY, (n, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32, **layout)}
        datasets.update({key: f.create_dataset(key, (n,), np.float32) for key in keys[1:]})
        f.attrs.update(attrs)

        pending = {key: [] for key in keys}  # simulated jets not yet written, in order
        written = n_events = 0
        with tqdm(total=n, unit="jet", desc="simulating jets", disable=not progress, smoothing=0.1) as bar:
            for result in _simulate_units(units, workers):
                for key in keys:
                    pending[key].append(result[key])
                n_events += result["events"]
                bar.update(len(result["y"]))
                bar.set_postfix(events=n_events, refresh=False)
                block = {key: np.concatenate(parts) for key, parts in pending.items()}
                # Write whole chunks only (a partial chunk would be compressed twice), and the tail at the end.
                count = len(block["y"]) if written + len(block["y"]) == n else len(block["y"]) // chunk * chunk
                if count == 0:
                    continue
                stop = written + count
                if not np.array_equal(block["y"][:count], labels[written:stop]):
                    raise RuntimeError("internal error: simulated jets arrived out of order")
                for key in keys:
                    datasets[key][written:stop] = block[key][:count]
                    pending[key] = [block[key][count:]]
                written = stop
        f.attrs["events"] = n_events
        if written != n:
            raise RuntimeError(f"internal error: wrote {written} of {n} jets")


def _simulate_units(units, workers):
    """Yield unit results in unit order, running at most ~2 units per worker ahead."""
    if workers == 1:
        for unit in units:
            yield simulate_unit(*unit)
        return

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_ignore_sigint)

    def submit(unit):
        # Workers are started by submit() and inherit this thread's signal mask: with SIGINT
        # blocked, a Ctrl-C that reaches them before _ignore_sigint runs is dropped instead of
        # printing a traceback. This process still gets it (another thread may take it), but
        # only once the worker is started: interrupted while it writes a new worker's start-up
        # data, it would leave that worker to fail with a traceback of its own.
        interrupted = []
        main_thread = threading.current_thread() is threading.main_thread()  # where Python handles signals
        handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True)) if main_thread else None
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return executor.submit(simulate_unit, *unit)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            if main_thread:
                signal.signal(signal.SIGINT, handler)
            if interrupted:
                raise KeyboardInterrupt

    pending = collections.deque()
    todo = iter(units)
    try:
        for unit in todo:
            pending.append(submit(unit))
            if len(pending) >= 2 * workers:
                break
        while pending:
            try:
                result = pending.popleft().result()
            except BrokenProcessPool as exc:
                raise RuntimeError(
                    "a generator worker process died (killed, or out of memory); no file was written. "
                    "Try fewer --workers."
                ) from exc
            for unit in todo:
                pending.append(submit(unit))
                break
            yield result
    except BaseException:
        # Units already running would otherwise finish first; stopping the workers
        # makes Ctrl-C and errors take effect at once. The pool then fails the futures
        # left; none is cancelled here, as failing a cancelled future raises
        # InvalidStateError in the pool's own thread (Python 3.11).
        for process in list(getattr(executor, "_processes", {}).values()):
            process.terminate()
        executor.shutdown(wait=False)
        raise
    executor.shutdown(wait=True)


def _ignore_sigint():
    # The parent decides what Ctrl-C means; workers just stop when told. Ignoring SIGINT
    # drops one still pending from the start, when it was blocked (see submit above).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


_sources: dict = {}


def _source(quark: bool, selection: JetSelection):
    """One initialised Pythia per flavour and selection per process (init takes ~0.5 s)."""
    key = (quark, selection)
    if key not in _sources:
        _sources[key] = JetSource(quark, selection)
    return _sources[key]


def simulate_unit(index: int, seed: int, labels: np.ndarray, selection: JetSelection, detector: Detector) -> dict:
    """Simulate the jets of one work unit, in the order of ``labels``.

    Pythia and the detector are reseeded from (seed, index, flavor), so the result
    does not depend on which process runs the unit or what it ran before.
    """
    labels = np.asarray(labels, np.float32)
    k = len(labels)
    out = {
        "X_jets": np.zeros((k, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32),
        "y": labels.copy(),
        "pt": np.zeros(k, np.float32),
        "m0": np.zeros(k, np.float32),
        "events": 0,
    }
    for flavor in (QUARK, 1 - QUARK):
        slots = np.flatnonzero(labels == flavor)
        if slots.size == 0:
            continue
        sequence = np.random.SeedSequence([seed, index, flavor])
        pythia_seq, detector_seq = sequence.spawn(2)
        source = _source(flavor == QUARK, selection)
        source.reseed(pythia_seed(pythia_seq))
        rng = np.random.default_rng(detector_seq)
        filled = 0
        for image, pt, mass, events in flavor_jets(source, detector, rng):
            slot = slots[filled]
            out["X_jets"][slot], out["pt"][slot], out["m0"][slot] = image, pt, mass
            out["events"] += events
            filled += 1
            if filled == slots.size:
                break
    return out


def flavor_jets(source, detector: Detector, rng):
    """Yield (image, jet pt, jet mass, events used) for accepted jets of the source's flavour, forever."""
    selection = source.selection
    events = accepted = 0
    cluster_eta = selection.eta_max + PARTICLE_ETA_MARGIN
    while True:
        if not source.next_event():
            continue  # Pythia rejected the event; the next one is independent
        events += 1
        central = source.particles(cluster_eta)
        jets = cluster_jets(central)
        chosen = select_jets(jets, source.partons(), source.quark, selection)
        for j in chosen:
            image = detector.render(
                central.pt, central.eta, central.phi, central.e, central.pdgid, central.charge,
                jets.eta[j], jets.phi[j], rng=rng,
            )
            accepted += 1
            yield image, float(jets.pt[j]), float(jets.mass[j]), events
            events = 0
        if accepted == 0 and events >= EFFICIENCY_PROBE:
            raise RuntimeError(
                f"no jet passed pT in [{selection.pt_min}, {selection.pt_max}) GeV and |eta| < {selection.eta_max} "
                f"in {events} events; widen the window"
            )
