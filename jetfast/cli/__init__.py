"""The ``jetfast`` command line.

One module per group of commands (:mod:`.data`, :mod:`.vae`, :mod:`.latent`, :mod:`.gpt`,
:mod:`.generate`, :mod:`.evaluate`, :mod:`.demo`). For each command, ``<name>_arguments(parser)``
defines its options and ``run_<name>(args) -> int`` turns them into a call of the library
function that does the work. These modules import only argparse at import time, so
``jetfast --help`` and ``jetfast <command> --help`` answer without loading torch; the
heavy imports happen inside the ``run_`` functions.

:func:`main` is the one place that handles errors: a user error (:data:`jetfast.errors.USER_ERRORS`:
bad values, missing or invalid files, refused settings) prints ``jetfast <command>: error: <message>``
on one line and exits with status 2, like argparse's own errors; Ctrl-C (or an error it caused)
prints ``interrupted`` and exits with 130; anything else is a bug and keeps its traceback. Progress
bars left open are closed first, so the message is a line of its own.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (command, module under jetfast.cli, one-line help). Nested commands use a space ("data generate").
COMMANDS = (
    ("data generate", "data", "simulate quark/gluon jet images with Pythia 8 + a detector model"),
    ("train-vae", "vae", "train the stage-1 convolutional VAE on a jet file"),
    ("fit-bins", "latent", "fit per-dimension latent bins (1-D K-Means) on a VAE run's training jets"),
    ("encode", "latent", "encode a run's jets to latent codes (HDF5) with its VAE and bins"),
    ("train-gpt", "gpt", "train the stage-2 class-conditional Transformer over latent codes"),
    ("evaluate-vae", "vae", "reconstruction quality and latent diagnostics of a trained VAE on its test jets"),
    ("generate", "generate", "sample new jets from a trained run and write them in the input layout"),
    ("demo", "demo", "the whole pipeline on a small simulated dataset: simulate, train, generate, evaluate"),
    ("evaluate", "evaluate", "physics report: observables, distances to a noise floor, classifier tests, plots"),
)


def build_parser() -> argparse.ArgumentParser:
    from jetfast import __version__

    parser = argparse.ArgumentParser(prog="jetfast", description="Fast generative simulation of quark/gluon jet images.")
    parser.add_argument("--version", action="version", version=f"jetfast {__version__}")
    top = parser.add_subparsers(dest="_command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, module_name, help_text in COMMANDS:
        words = name.split()
        parent = top
        for depth, word in enumerate(words[:-1]):
            key = " ".join(words[: depth + 1])
            if key not in groups:
                group_parser = parent.add_parser(word, help=f"{word} commands")
                groups[key] = group_parser.add_subparsers(dest=f"_{key}_command", metavar="COMMAND", required=True)
            parent = groups[key]
        module = importlib.import_module(f"jetfast.cli.{module_name}")
        function = name.replace(" ", "_").replace("-", "_")
        sub = parent.add_parser(words[-1], help=help_text, description=help_text)
        getattr(module, f"{function}_arguments")(sub)
        sub.set_defaults(_run=getattr(module, f"run_{function}"), _name=name)
    return parser


def keyword_options(args: argparse.Namespace) -> dict:
    """The command's options as keyword arguments (argparse's own entries left out)."""
    return {key: value for key, value in vars(args).items() if not key.startswith("_")}


def main(argv: list[str] | None = None) -> int:
    from jetfast.errors import USER_ERRORS

    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except BaseException as exc:
        interrupted = _interrupted(exc)
        if not interrupted and not isinstance(exc, USER_ERRORS):
            raise
        _close_progress_bars()
        if interrupted:
            print("interrupted", file=sys.stderr)
            return 130
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"jetfast {args._name}: error: {message}", file=sys.stderr)
        return 2
    finally:
        _end_process_group()


def _interrupted(exc: BaseException | None) -> bool:
    """Whether ``exc`` is Ctrl-C, or an error it caused (an import cut short raises ImportError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _close_progress_bars() -> None:
    """Close the bars a failed command left open, so that its message starts on a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def _end_process_group() -> None:
    """Tear down torch.distributed if a command started it (torchrun), whatever happened."""
    if "torch.distributed" in sys.modules:
        from jetfast.distributed import cleanup

        cleanup()
