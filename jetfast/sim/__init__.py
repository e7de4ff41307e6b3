"""Simulated jets: Pythia 8 events and FastJet jets (:mod:`.pythia`), the detector model that
images them (:mod:`.detector`), and the file writer behind ``jetfast data generate``
(:mod:`.simulate`, :func:`generate_jets`).

``generate_jets`` is imported on first use: Pythia and FastJet load only when asked for.
"""


def __getattr__(name):
    if name == "generate_jets":
        from jetfast.sim.simulate import generate_jets

        return generate_jets
    raise AttributeError(f"module 'jetfast.sim' has no attribute {name!r}")
