"""``jetfast train-vae`` (:func:`jetfast.train.vae.train_vae`) and ``jetfast evaluate-vae``
(:func:`jetfast.evaluate.vae.evaluate_vae`)."""

from __future__ import annotations

import argparse
import sys

from jetfast.cli.options import DefaultsHelpFormatter, execution_arguments

TRAIN_VAE_EPILOG = """\
Data parallel on several processes (gloo on CPUs, NCCL on GPUs):
  torchrun --nproc-per-node 4 -m jetfast.cli train-vae --data jets.h5 --out runs/vae
"""


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated channel counts like 32,64,128,256; got {text!r}")
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"channel counts must be positive; got {text!r}")
    return widths


def train_vae_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsHelpFormatter
    parser.epilog = TRAIN_VAE_EPILOG
    io = parser.add_argument_group("input and output")
    io.add_argument("--data", required=True, help="HDF5 jet file: X_jets (N,125,125,3) and y (N,)")
    io.add_argument("--out", required=True, help="run directory to create (config, metrics, checkpoints, plots)")
    io.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt")
    io.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    io.add_argument("--max-jets", type=int, default=None, help="use only the first N jets of the file")
    io.add_argument("--val-fraction", type=float, default=0.1, help="fraction of jets for validation")
    io.add_argument("--test-fraction", type=float, default=0.1, help="fraction of jets held out for evaluation")
    io.add_argument("--transform-jets", type=int, default=1000,
                    help="training jets used to fit the intensity transform")

    model = parser.add_argument_group("model")
    model.add_argument("--latent-dim", type=int, default=128, help="latent dimensions")
    model.add_argument("--widths", type=_widths, default=(32, 64, 128, 256),
                       help="encoder channels per stride-2 stage (decoder mirrors them)")
    model.add_argument("--beta", type=float, default=1.0, help="weight of the KL term")
    model.add_argument("--recon", choices=("sparse", "mse", "gaussian_nll"), default="sparse",
                       help="observation model: sparse (per pixel a hit probability and a log-normal mixture intensity, HCAL in "
                            "towers), or the mean-image baselines: squared error, Gaussian NLL with learned variance")
    model.add_argument("--intensity-components", type=int, default=3,
                       help="sparse: log-normal components of each pixel's intensity distribution (with one, ECAL "
                            "energies and the leading-cell fraction come out biased high)")
    model.add_argument("--no-channel-totals", dest="channel_totals", action="store_false",
                       help="sparse: no head for each channel's total (pixels alone then set a jet's energy, and "
                            "their independent noise adds up: pT comes out too broad)")
    model.add_argument("--no-total-correlations", dest="total_correlations", action="store_false",
                       help="sparse: draw the channel totals independently (their sum, and the jet pT, then spread "
                            "about twice as much as in the data: the channels share a jet's energy)")
    model.add_argument("--totals-basis", choices=("calorimeter", "channels"), default="calorimeter",
                       help="sparse: what the totals' Gaussian is over: calorimeter (default: Tracks, the ECAL+HCAL sum and "
                            "its ECAL fraction, as a calorimeter's response and electromagnetic fraction vary) or channels "
                            "(each channel's total: the calorimeter sum, and with it the jet pT, then comes out too broad)")
    model.add_argument("--no-pixel-shares", dest="pixel_shares", action="store_false",
                       help="sparse: model pixel intensities in GeV rather than as shares of their channel's total (the "
                            "totals' swing is then counted again in every pixel, and the jets' cores come out soft)")
    model.add_argument("--no-hit-counts", dest="hit_counts", action="store_false",
                       help="sparse: no head for each channel's number of hits; by default a jet draws its number of "
                            "hits first and the decoder places that many (pixels hit independently give a Poisson-like "
                            "count: too narrow, with half the quark/gluon difference)")
    model.add_argument("--no-conditioning", dest="conditioned", action="store_false",
                       help="do not show the encoder and decoder each jet's class, pT and mass (y, pt, m0 of the file): "
                            "the latents then have to carry them, and generation cannot be asked for a jet's pT")
    model.add_argument("--kl-warmup-epochs", type=float, default=1.0,
                       help="epochs over which the KL weight ramps linearly from 0 to --beta")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--no-augment", dest="augment", action="store_false",
                     help="do not mirror training jets in eta and phi at random")
    opt.add_argument("--epochs", type=int, default=20, help="maximum number of epochs")
    opt.add_argument("--batch-size", type=int, default=64, help="jets per step (per process under torchrun)")
    opt.add_argument("--lr", type=float, default=1e-3, help="initial learning rate")
    opt.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (AdamW when > 0, else Adam)")
    opt.add_argument("--grad-clip", type=float, default=5.0, help="clip the global gradient norm (0: off)")
    opt.add_argument("--lr-schedule", choices=("cosine", "plateau"), default="cosine",
                     help="cosine: decay the lr per step along a cosine to --min-lr-ratio x --lr at the last epoch; "
                          "plateau: halve it after --lr-patience epochs without val improvement")
    opt.add_argument("--min-lr-ratio", type=float, default=0.02, help="final lr of the cosine decay, relative to --lr")
    opt.add_argument("--lr-patience", type=int, default=2, help="plateau schedule: epochs without val improvement before halving the lr")
    opt.add_argument("--patience", type=int, default=6, help="epochs without val improvement before stopping (0: never)")

    run = execution_arguments(parser, seed_help="seed for the split, initialisation, shuffling and sampling")
    run.add_argument("--loader-threads", type=int, default=None, help="decoding threads of the jet loader")


def run_train_vae(args: argparse.Namespace) -> int:
    from jetfast.cli import keyword_options
    from jetfast.train.vae import train_vae

    train_vae(**keyword_options(args))
    return 0


def evaluate_vae_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsHelpFormatter
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a `jetfast train-vae` run directory")
    parser.add_argument("--data", default=None, help="the jet file the run was trained on (default: the one in config.json)")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/eval)")
    parser.add_argument("--max-jets", type=int, default=None, help="evaluate at most this many test jets")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint to evaluate")
    parser.add_argument("--batch-size", type=int, default=64, help="jets per forward pass")
    parser.add_argument("--show", type=int, default=4, help="jets drawn in reconstructions.png")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the sampled reconstructions and of the half/half split of the latent classifier")
    parser.add_argument("--decode", choices=("sample", "mean"), default="sample",
                        help="reconstructions drawn from the observation model, or its expected image")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_evaluate_vae(args: argparse.Namespace) -> int:
    from jetfast.data.format import CHANNELS
    from jetfast.evaluate.vae import evaluate_vae

    metrics = evaluate_vae(args.run_dir, data=args.data, out=args.out, max_jets=args.max_jets,
                           checkpoint=args.checkpoint, batch_size=args.batch_size, show=args.show, seed=args.seed,
                           decode=args.decode, progress=not args.no_progress)
    summary = ", ".join(f"{c} rel. energy error median {metrics['channels'][c]['total_energy_rel_error']['median']:+.3f}"
                        for c in CHANNELS)
    print(f"jetfast evaluate-vae: {metrics['n_test_jets']} test jets; {summary}; "
          f"latent q/g AUC {metrics['latent']['qg_auc']}; wrote {metrics['out_dir']}", file=sys.stderr)
    return 0
