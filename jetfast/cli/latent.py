"""``jetfast fit-bins`` (:func:`jetfast.latent.fit.fit_run_bins`) and ``jetfast encode``
(:func:`jetfast.latent.encode.encode_run`)."""

from __future__ import annotations

import argparse
import sys

from jetfast.cli.options import encoder_arguments

# jetfast.bins.METHODS, spelled here so that --help does not import NumPy (a test checks they agree).
BIN_METHODS = ("lloyd1d", "faiss", "exact")


def fit_bins_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a `jetfast train-vae` run directory")
    parser.add_argument("--data", default=None, help="the jet file (default: the one the run was trained on)")
    parser.add_argument("--num-bins", type=int, default=256, help="bins (K-Means centers) per latent dimension (default: %(default)s)")
    parser.add_argument("--method", choices=BIN_METHODS, default="lloyd1d",
                        help="lloyd1d: native, near-exact and fast; faiss: FAISS Lloyd (GPU if available); "
                             "exact: the optimum (slow: seconds per dimension). Default: %(default)s")
    parser.add_argument("--max-jets", type=int, default=None,
                        help="fit on a random subset of this many training jets (default: all of them)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the --max-jets subset and for faiss (default: %(default)s)")
    encoder_arguments(parser)


def run_fit_bins(args: argparse.Namespace) -> int:
    from jetfast.latent.encoder import format_report
    from jetfast.latent.fit import fit_run_bins

    report = fit_run_bins(args.run_dir, **_encoder_options(args), data=args.data, num_bins=args.num_bins,
                          method=args.method, max_jets=args.max_jets, seed=args.seed)
    print(format_report("jetfast fit-bins", report), file=sys.stderr)
    print(f"jetfast fit-bins: {report['latent_dim']} dimensions x {report['num_bins']} bins ({report['method']}) "
          f"from {report['num_vectors']} training jets in {report['fit_seconds']:.2f} s; wrote {report['bins_file']}",
          file=sys.stderr)
    return 0


def encode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a `jetfast train-vae` run with bins.npz from `jetfast fit-bins`")
    parser.add_argument("--data", default=None, help="the jet file (default: the one the run was trained on)")
    parser.add_argument("--out", default=None, help="codes file to write (default: RUN_DIR/codes.h5)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing codes file")
    encoder_arguments(parser)


def run_encode(args: argparse.Namespace) -> int:
    from jetfast.latent.encode import encode_run
    from jetfast.latent.encoder import format_report

    report = encode_run(args.run_dir, **_encoder_options(args), data=args.data, out=args.out, overwrite=args.overwrite)
    print(format_report("jetfast encode", report), file=sys.stderr)
    print(f"jetfast encode: wrote {report['codes_file']} ({report['num_jets']} jets x {report['latent_dim']} codes) "
          f"in {report['seconds']:.1f} s; report in {report['report_file']}", file=sys.stderr)
    return 0


def _encoder_options(args: argparse.Namespace) -> dict:
    """The options of :func:`jetfast.cli.options.encoder_arguments` as keyword arguments."""
    return {"batch_size": args.batch_size, "checkpoint": args.checkpoint, "report_jets": args.report_jets,
            "device": args.device, "num_threads": args.num_threads, "progress": not args.no_progress}
