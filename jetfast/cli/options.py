"""Option groups that several commands share, defined once."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except a switch's: "--no-pixel-shares (default: True)" would
    read as if pixel shares were off by default."""

    def _get_help_string(self, action):
        if action.nargs == 0:  # store_true / store_false / help
            return action.help
        return super()._get_help_string(action)


def torch_device(text: str) -> str:
    """``--device``: a torch device this machine has, checked when the options are parsed."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device; use cpu or cuda[:i]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available here; use cpu")
    return text


def execution_arguments(parser: argparse.ArgumentParser, seed_help: str):
    """The options every trainer has: seed, torch threads, progress bar."""
    group = parser.add_argument_group("execution")
    group.add_argument("--seed", type=int, default=0, help=seed_help)
    group.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                       help="bf16 autocast (fp32 weights and losses) or fp32; auto: bf16 where the CPU (AVX512-BF16, "
                            "AMX) or GPU computes it natively")
    group.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    return group


def encoder_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that run a VAE run's encoder over its jets (fit-bins, encode)."""
    parser.add_argument("--batch-size", type=int, default=256, help="jets per encoder batch (default: %(default)s)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which VAE checkpoint to use (default: %(default)s)")
    parser.add_argument("--report-jets", type=int, default=512,
                        help="jets decoded twice, from mu and from the codes, to measure the image change (default: %(default)s)")
    parser.add_argument("--device", type=torch_device, default=None,
                        help="torch device for the VAE (default: cuda if available, else cpu)")
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
