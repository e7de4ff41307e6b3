"""Pythia jet-image generation throughput, per core and on all cores.

Baseline in the same run: bare ``Pythia.next()`` with the generator's settings (the
showers, MPI and hadronisation every kept jet has to pay for). The generator adds
reading the event record, FastJet clustering, parton matching and the detector
model, and needs several events per kept jet (most partons near pT-hat-min make a
jet below pt_min, or outside |eta| < eta_max).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

pytest.importorskip("pythia8mc")
pytest.importorskip("fastjet")

from jetfast.sim import simulate as sim  # noqa: E402
from jetfast.sim.pythia import JetSelection  # noqa: E402

SELECTION = JetSelection()
EVENTS, JETS = 100, 32


@pytest.mark.parametrize("flavour", ["quark", "gluon"])
def test_pythia_events(benchmark, record, flavour):
    source = sim._source(flavour == "quark", SELECTION)
    source.reseed(1)
    source.next_event()  # warm-up

    def events():
        for _ in range(EVENTS):
            source.next_event()

    benchmark.pedantic(events, rounds=2, warmup_rounds=0)
    record(events_per_s_per_core=EVENTS / benchmark.stats.stats.min)


@pytest.mark.parametrize("flavour", ["quark", "gluon"])
def test_simulate_unit(benchmark, record, flavour):
    labels = np.full(JETS, 1.0 if flavour == "quark" else 0.0, np.float32)
    sim.simulate_unit(0, 0, labels[:2], SELECTION, sim.CMS_LIKE)  # Pythia init outside the timing
    results, cpu_seconds = [], []

    def unit():
        start = time.process_time()
        results.append(sim.simulate_unit(len(results) + 1, 0, labels, SELECTION, sim.CMS_LIKE))
        cpu_seconds.append(time.process_time() - start)

    benchmark.pedantic(unit, rounds=2, warmup_rounds=0)
    seconds = benchmark.stats.stats.mean
    events = np.mean([r["events"] for r in results])
    record(
        jets_per_s_per_core=JETS / seconds,
        # CPU time is what a shared machine cannot inflate much: the rate on a quiet core
        jets_per_cpu_s=JETS / np.mean(cpu_seconds),
        events_per_s_per_core=events / seconds,
        events_per_jet=events / JETS,
    )


def test_simulate_file_all_cores(benchmark, record, tmp_path):
    n = 256
    workers = os.cpu_count()

    def run():
        out = tmp_path / f"jets-{time.perf_counter_ns()}.h5"
        sim.generate_jets(n, out, seed=1, workers=workers, progress=False)

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    record(jets_per_s=n / benchmark.stats.stats.min, workers=workers, note="includes worker start-up and Pythia init")
