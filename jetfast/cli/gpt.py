"""``jetfast train-gpt``: train the code Transformer (:func:`jetfast.train.gpt.train_gpt`)."""

from __future__ import annotations

import argparse

from jetfast.cli.options import execution_arguments

TRAIN_GPT_EPILOG = """\
Data parallel on several processes (gloo on CPUs, NCCL on GPUs):
  torchrun --nproc-per-node 4 -m jetfast.cli train-gpt RUN_DIR
"""


def train_gpt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = TRAIN_GPT_EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the VAE run directory the codes come from")
    io = parser.add_argument_group("input and output")
    io.add_argument("--codes", default=None,
                    help="codes file from `jetfast encode` (default: RUN_DIR/codes.h5)")
    io.add_argument("--out", default=None, help="GPT run directory (default: RUN_DIR/gpt)")
    io.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt")
    io.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")

    model = parser.add_argument_group("model")
    model.add_argument("--d-model", type=int, default=256, help="width of the residual stream")
    model.add_argument("--n-heads", type=int, default=8, help="attention heads (must divide --d-model)")
    model.add_argument("--n-layers", type=int, default=4, help="Transformer blocks")
    model.add_argument("--dropout", type=float, default=0.1, help="dropout in attention, MLP and embeddings")
    model.add_argument("--tie-weights", action="store_true", help="share the output head with the code embedding")
    model.add_argument("--no-code-values", dest="code_values", action="store_false",
                       help="read the codes as plain tokens, not also the values of their bin centers")
    model.add_argument("--no-kinematics", dest="kinematic", action="store_false",
                       help="condition on the class only, even when the codes carry the jets' pt and m0")
    model.add_argument("--p-uncond", type=float, default=0.1,
                       help="probability of hiding the class (the unconditional token), and, independently, "
                            "the pT and the mass, from a training sequence")
    model.add_argument("--posterior-draws", action="store_true",
                       help="train on codes drawn afresh at every step from each jet's VAE posterior (the codes "
                            "file's posterior_std) instead of the codes of the posterior means: wider jets")
    model.add_argument("--select", choices=("fidelity", "loss"), default="fidelity",
                       help="the best checkpoint: the epoch whose jets, generated for the validation jets and decoded "
                            "by the VAE, are closest to them by the observables of `evaluate` (fidelity, the "
                            "default; about 10 s per 1,000 validation jets per epoch), or the lowest validation loss")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=30, help="maximum number of epochs")
    opt.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in total")
    opt.add_argument("--batch-size", type=int, default=256, help="sequences per step (per process under torchrun)")
    opt.add_argument("--lr", type=float, default=6e-4, help="peak learning rate")
    opt.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr of the cosine decay, relative to --lr")
    opt.add_argument("--warmup-steps", type=int, default=None,
                     help="linear warm-up steps (default: 5%% of all steps, at most 1000)")
    opt.add_argument("--weight-decay", type=float, default=0.1,
                     help="AdamW weight decay of the matrices (never LayerNorm, biases or embeddings)")
    opt.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    opt.add_argument("--patience", type=int, default=0,
                     help="epochs without val improvement before stopping (0: never)")

    execution_arguments(parser, seed_help="seed for initialisation, shuffling and class dropout")


def run_train_gpt(args: argparse.Namespace) -> int:
    from jetfast.cli import keyword_options
    from jetfast.train.gpt import train_gpt

    train_gpt(**keyword_options(args))
    return 0
