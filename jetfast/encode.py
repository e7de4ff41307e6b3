"""``jetfast encode``: the latent codes of a run's jets, for the code Transformer
(see :mod:`jetfast.latent.encode`)."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = "encode a run's jets to latent codes (HDF5) with its VAE and bins"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a `jetfast train-vae` run with bins.npz from `jetfast fit-bins`")
    parser.add_argument("--data", default=None, help="the jet file (default: the one the run was trained on)")
    parser.add_argument("--out", default=None, help="codes file to write (default: RUN_DIR/codes.h5)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing codes file")
    add_encoder_arguments(parser)


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared with ``jetfast fit-bins``."""
    parser.add_argument("--batch-size", type=int, default=256, help="jets per encoder batch (default: %(default)s)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which VAE checkpoint to use (default: %(default)s)")
    parser.add_argument("--report-jets", type=int, default=512,
                        help="jets decoded twice, from mu and from the codes, to measure the image change (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device for the VAE (default: cuda if available, else cpu)")
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from jetfast.errors import USER_ERRORS
    from jetfast.latent.encode import encode_run
    from jetfast.latent.encoder import format_report

    try:
        report = encode_run(args.run_dir, data=args.data, out=args.out, overwrite=args.overwrite,
                            batch_size=args.batch_size, checkpoint=args.checkpoint, report_jets=args.report_jets,
                            device=args.device, num_threads=args.num_threads, progress=not args.no_progress)
    except USER_ERRORS as exc:
        print(f"jetfast encode: error: {exc}", file=sys.stderr)
        return 2
    print(format_report("jetfast encode", report), file=sys.stderr)
    print(f"jetfast encode: wrote {report['codes_file']} ({report['num_jets']} jets x {report['latent_dim']} codes) "
          f"in {report['seconds']:.1f} s; report in {report['report_file']}", file=sys.stderr)
    return 0
