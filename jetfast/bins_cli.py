"""``jetfast fit-bins``: fit the per-dimension latent bins of a trained VAE run.

The training jets of the run (``split.npz``), or a random subset of them
(``--max-jets``), are encoded to their posterior means ``mu``; K-Means then places
``--num-bins`` centers on every latent dimension (see :mod:`jetfast.bins`). Writes,
atomically, into the run directory::

    bins.npz            centers (D, K) float32, rows sorted; method, num_bins, num_vectors,
                        seed, inertia (D,) float64, relative_rms (D,), checkpoint, data
    bins_report.json    the fit (method, sizes, time) and what quantising costs: the RMS
                        error per dimension relative to the latent spread, and the change
                        of the decoded images in model space and in GeV

Then ``jetfast encode RUN_DIR`` writes the codes of every jet with these bins.
"""

from __future__ import annotations

import argparse
import sys
import time

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

    try:
        report = fit(args)
    except USER_ERRORS as exc:
        print(f"jetfast fit-bins: error: {exc}", file=sys.stderr)
        return 2
    from jetfast.encode import format_report

    print(format_report("jetfast fit-bins", report), file=sys.stderr)
    print(f"jetfast fit-bins: {report['latent_dim']} dimensions x {report['num_bins']} bins ({report['method']}) "
          f"from {report['num_vectors']} training jets in {report['fit_seconds']:.2f} s; wrote {report['bins_file']}",
          file=sys.stderr)
    return 0


def training_subset(train, max_jets: int | None, seed: int):
    """The training jets to fit on: all, or a seeded random subset in file order."""
    import numpy as np

    from jetfast.errors import InvalidArgument

    train = np.sort(np.asarray(train, np.int64))
    if max_jets is None or max_jets >= len(train):
        return train
    if max_jets < 1:
        raise InvalidArgument(f"--max-jets must be >= 1; got {max_jets}")
    return np.sort(np.random.default_rng(seed).choice(train, size=max_jets, replace=False))


def fit(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from jetfast import bins
    from jetfast.errors import BinFitError
    from jetfast.encode import EncoderContext, ImageChange, LatentError
    from jetfast.ops import dequantize, quantize
    from jetfast.run import write_json

    start = time.perf_counter()
    bins.check_num_bins(args.num_bins)
    context = EncoderContext(args.run_dir, args.data, args.checkpoint, args.device, args.num_threads)
    jets = training_subset(context.split.get("train", []), args.max_jets, args.seed)
    if len(jets) < args.num_bins:
        raise BinFitError(
            f"the run has {len(jets)} training jets{' in the --max-jets subset' if args.max_jets else ''}, "
            f"fewer than --num-bins {args.num_bins}; ask for fewer bins"
        )

    latents = np.empty((len(jets), context.vae_config.latent_dim), np.float32)
    filled = 0
    for mu, _ in context.batches(jets, args.batch_size, "fit-bins: encode", not args.no_progress):
        latents[filled : filled + len(mu)] = mu.numpy()
        filled += len(mu)
    if filled != len(jets):
        raise RuntimeError(f"encoded {filled} jets but expected {len(jets)}")
    encode_seconds = time.perf_counter() - start

    threads = torch.get_num_threads()
    centers, info = bins.fit_bins_with_info(latents, args.num_bins, args.method, seed=args.seed, num_threads=threads)
    inertia = bins.inertia(latents, centers)

    # What quantising costs, measured on the latents the bins were fitted on.
    centers_t = torch.from_numpy(centers)
    latent_error = LatentError(latents.shape[1])
    image_change = ImageChange(context.model, context.transform, args.report_jets)
    for begin in range(0, len(latents), args.batch_size):
        mu = torch.from_numpy(latents[begin : begin + args.batch_size])
        z_hat = dequantize(quantize(mu, centers_t), centers_t)
        latent_error.add(mu, z_hat)
        image_change.add(mu, z_hat)
    latent = latent_error.result()

    bins_file = context.run.bins_path
    bins.save_bins(
        bins_file, centers, method=args.method, num_bins=args.num_bins, num_vectors=len(jets), seed=args.seed,
        inertia=inertia, relative_rms=np.asarray(latent["relative_rms"]), checkpoint=args.checkpoint, data=context.data,
    )
    report = {
        "command": "fit-bins",
        "bins_file": str(bins_file.resolve()),
        "data": context.data,
        "checkpoint": args.checkpoint,
        "method": args.method,
        "num_bins": int(args.num_bins),
        "latent_dim": int(latents.shape[1]),
        "num_vectors": int(len(jets)),
        "seed": int(args.seed),
        "encode_seconds": encode_seconds,
        "fit_seconds": info["fit_seconds"],
        "inertia": inertia.tolist(),
        "distinct_values": info.get("distinct_values"),
        "iterations": info.get("iterations"),
        "latent_error": latent,
        "image_change": image_change.result(),
    }
    write_json(context.run.bins_report_path, report)
    return report
