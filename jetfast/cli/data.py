"""``jetfast data generate``: simulate a quark/gluon jet-image file (:func:`jetfast.sim.simulate.generate_jets`)."""

from __future__ import annotations

import argparse
import os

EPILOG = """\
Quark jets come from HardQCD:qq2qq + qqbar2qqbarNew, gluon jets from HardQCD:gg2gg +
qqbar2gg (pp at 13 TeV, MPI and hadronisation on); anti-kT R=0.4 jets (FastJet) are
labelled by the hard parton within Delta R < 0.4 and imaged by a CMS-like detector
model (see jetfast/sim/detector.py). The same --seed and --n give the same file
whatever --workers is. Please cite Pythia 8.3 (SciPost Phys. Codebases 8 (2022)) and
FastJet (EPJC 72 (2012) 1896) when you use these files.

example:
  jetfast data generate --n 5000 --out jets.h5 --seed 1
"""


def data_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--n", type=int, required=True, help="number of jets to write")
    parser.add_argument("--out", required=True, help="output HDF5 file (written atomically)")
    parser.add_argument("--quark-fraction", type=float, default=0.5, help="fraction of quark jets (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="master random seed (default 0)")
    parser.add_argument(
        "--workers", type=int, default=None, help=f"worker processes (default: all cores, {os.cpu_count()} here)"
    )
    parser.add_argument(
        "--compression", choices=("lzf", "gzip", "none"), default="lzf",
        help="X_jets compression: lzf (default, fast), gzip (with shuffle, smaller), none (contiguous)",
    )
    parser.add_argument("--chunk", type=int, default=32, help="jets per HDF5 chunk of X_jets (default 32)")
    parser.add_argument("--pt-min", type=float, default=70.0, help="minimum jet pT in GeV (default 70)")
    parser.add_argument("--pt-max", type=float, default=200.0, help="maximum jet pT in GeV (default 200)")
    parser.add_argument("--eta-max", type=float, default=1.4, help="maximum |eta| of the jet axis (default 1.4)")
    parser.add_argument(
        "--pthat-min-fraction", type=float, default=0.7,
        help="Pythia pT-hat-min as a fraction of --pt-min (default 0.7: <1%% of jets lost at the low edge; "
        "0.8 is ~1.5x faster but loses ~4%% of quark and ~8%% of gluon jets near --pt-min)",
    )
    parser.add_argument("--no-smearing", action="store_true", help="exact detector deposits, no resolution smearing")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_data_generate(args: argparse.Namespace) -> int:
    import dataclasses
    import signal
    import sys
    import time

    import h5py

    from jetfast.sim.detector import CMS_LIKE
    from jetfast.sim.simulate import generate_jets

    def terminate(signum, frame):
        # Unwind normally on `kill` so the temporary file is removed.
        print("terminated; no file written", file=sys.stderr)
        raise SystemExit(128 + signum)

    previous_handler = signal.signal(signal.SIGTERM, terminate)
    detector = dataclasses.replace(CMS_LIKE, smear=False) if args.no_smearing else CMS_LIKE
    start = time.perf_counter()
    try:
        path = generate_jets(
            args.n, args.out, quark_fraction=args.quark_fraction, seed=args.seed, workers=args.workers,
            compression=args.compression, pt_min=args.pt_min, pt_max=args.pt_max, eta_max=args.eta_max,
            pthat_min_fraction=args.pthat_min_fraction, chunk=args.chunk, overwrite=args.overwrite,
            detector=detector, progress=not args.quiet,
        )
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    seconds = time.perf_counter() - start
    with h5py.File(path, "r") as f:
        events = int(f.attrs["events"])
        quarks = int(f["y"][:].sum())
    print(
        f"wrote {args.n} jets ({quarks} quark, {args.n - quarks} gluon) from {events} events to {path} "
        f"in {seconds:.1f} s ({args.n / seconds:.1f} jets/s)"
    )
    return 0
