"""``jetfast fit-bins``: fit the per-dimension latent bins of a trained VAE run
(see :mod:`jetfast.latent.fit`)."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = "fit per-dimension latent bins (1-D K-Means) on a VAE run's training jets"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jetfast.bins import METHODS
    from jetfast.encode import add_encoder_arguments

    parser.add_argument("run_dir", metavar="RUN_DIR", help="a `jetfast train-vae` run directory")
    parser.add_argument("--data", default=None, help="the jet file (default: the one the run was trained on)")
    parser.add_argument("--num-bins", type=int, default=256, help="bins (K-Means centers) per latent dimension (default: %(default)s)")
    parser.add_argument("--method", choices=METHODS, default="lloyd1d",
                        help="lloyd1d: native, near-exact and fast; faiss: FAISS Lloyd (GPU if available); "
                             "exact: the optimum (slow: seconds per dimension). Default: %(default)s")
    parser.add_argument("--max-jets", type=int, default=None,
                        help="fit on a random subset of this many training jets (default: all of them)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the --max-jets subset and for faiss (default: %(default)s)")
    add_encoder_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from jetfast.errors import USER_ERRORS
    from jetfast.latent.encoder import format_report
    from jetfast.latent.fit import fit_run_bins

    try:
        report = fit_run_bins(args.run_dir, data=args.data, num_bins=args.num_bins, method=args.method,
                              max_jets=args.max_jets, seed=args.seed, batch_size=args.batch_size,
                              checkpoint=args.checkpoint, report_jets=args.report_jets, device=args.device,
                              num_threads=args.num_threads, progress=not args.no_progress)
    except USER_ERRORS as exc:
        print(f"jetfast fit-bins: error: {exc}", file=sys.stderr)
        return 2

    print(format_report("jetfast fit-bins", report), file=sys.stderr)
    print(f"jetfast fit-bins: {report['latent_dim']} dimensions x {report['num_bins']} bins ({report['method']}) "
          f"from {report['num_vectors']} training jets in {report['fit_seconds']:.2f} s; wrote {report['bins_file']}",
          file=sys.stderr)
    return 0
