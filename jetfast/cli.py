"""The ``jetfast`` command line.

Each command lives beside the code it drives and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. Heavy imports stay inside
``run`` so that ``jetfast --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (command, module, one-line help). Nested commands use a space ("data generate").
COMMANDS = [
    ("data generate", "jetfast.data.generate_cli", "simulate quark/gluon jet images with Pythia 8 + a detector model"),
    ("train-vae", "jetfast.train.vae", "train the stage-1 convolutional VAE on a jet file"),
    ("fit-bins", "jetfast.bins_cli", "fit per-dimension latent bins (1-D K-Means) on a VAE run's training jets"),
    ("encode", "jetfast.encode", "encode a run's jets to latent codes (HDF5) with its VAE and bins"),
    ("train-gpt", "jetfast.train.gpt", "train the stage-2 class-conditional Transformer over latent codes"),
    ("evaluate-vae", "jetfast.evaluate.vae_report", "reconstruction quality and latent diagnostics of a trained VAE on its test jets"),
    ("generate", "jetfast.generate", "sample new jets from a trained run and write them in the input layout"),
    ("demo", "jetfast.demo", "the whole pipeline on a small simulated dataset: simulate, train, generate, evaluate"),
    ("evaluate", "jetfast.evaluate.report", "physics report: observables, distances to a noise floor, classifier tests, plots"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jetfast",
        description="Fast generative simulation of quark/gluon jet images.",
    )
    from jetfast import __version__

    parser.add_argument("--version", action="version", version=f"jetfast {__version__}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, module_name, help_text in COMMANDS:
        words = name.split()
        parent = top
        for depth, word in enumerate(words[:-1]):
            key = " ".join(words[: depth + 1])
            if key not in groups:
                group_parser = parent.add_parser(word, help=f"{word} commands")
                groups[key] = group_parser.add_subparsers(dest=f"{key}_command", metavar="COMMAND", required=True)
            parent = groups[key]
        module = importlib.import_module(module_name)
        sub = parent.add_parser(words[-1], help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
