"""``jetfast demo``: simulate jets, train both stages, generate, evaluate.

Every stage is the real command a user would run (``jetfast data generate``,
``train-vae``, ``fit-bins``, ``encode``, ``train-gpt``, ``generate``, ``evaluate``); the
last two stages generate the held-out test jets one to one from their class, pT and mass
(``generate --like``) and evaluate the detector response.
Two presets size it: ``quick`` (the default) fits 2 CPU cores in about twelve minutes where
they have bf16 units (AVX512-BF16), about 28 where they have AVX2 only; ``hour`` is the longer
fidelity run (about an hour on the former); every size is also an
option of its own, so the same command scales to the full dataset on a GPU. A stage
that finished is skipped when the demo is run again (``--restart`` starts over).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

STAGES = ("data", "train-vae", "fit-bins", "encode", "train-gpt", "generate", "evaluate", "generate-like",
          "evaluate-like")

# Sizes of each preset; an option given on the command line wins.
PRESETS = {
    "quick": {"jets": 4000, "generate": 2000, "vae_epochs": 8, "gpt_epochs": 8, "gpt_size": (128, 4, 3), "beta": 1.0},
    "hour": {"jets": 12000, "generate": 4000, "vae_epochs": 16, "gpt_epochs": 12, "gpt_size": (128, 4, 3), "beta": 0.2},
}


def _gpt_size(text: str) -> tuple[int, int, int]:
    try:
        d_model, heads, layers = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three integers d_model,heads,layers like 128,4,3; got {text!r}")
    return d_model, heads, layers


def demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo", help="demo directory (default ./demo)")
    parser.add_argument("--preset", choices=("quick", "hour"), default="quick",
                        help="sizes: quick (default; ~12 min on 2 cores with AVX512-BF16, ~28 on AVX2 only) or hour (the longer "
                             "fidelity run, ~1 h on the former); "
                             + "; ".join(f"{name}: {', '.join(f'{k}={v}' for k, v in sizes.items())}"
                                         for name, sizes in PRESETS.items()))
    parser.add_argument("--jets", type=int, default=None, help="Pythia jets to simulate (default: the preset's)")
    parser.add_argument("--generate", type=int, default=None, help="jets to generate (default: the preset's)")
    parser.add_argument("--vae-epochs", type=int, default=None, help="VAE epochs (default: the preset's)")
    parser.add_argument("--gpt-epochs", type=int, default=None, help="Transformer epochs (default: the preset's)")
    parser.add_argument("--beta", type=float, default=None,
                        help="KL weight of the VAE (default: the preset's; the hour preset's 0.2 keeps more of each jet "
                             "in the latents, for the Transformer to model, which pays once both are trained longer)")
    parser.add_argument("--latent-dim", type=int, default=128, help="latent dimensions = codes per jet (default 128)")
    parser.add_argument("--bins", type=int, default=256, help="bins per latent dimension (default 256)")
    parser.add_argument("--gpt-size", type=_gpt_size, default=None, metavar="D_MODEL,HEADS,LAYERS",
                        help="Transformer d_model,heads,layers (default: the preset's)")
    parser.add_argument("--workers", type=int, default=None, help="Pythia worker processes (default: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage (default 0)")
    parser.add_argument("--restart", action="store_true", help="delete the demo directory and start over")


def _stage(out: Path, name: str, argv: list[str], log: dict) -> None:
    from jetfast.cli import main
    from jetfast.errors import UserError

    marker = out / f".done-{name}"
    if marker.exists():
        print(f"[demo] {name}: done in an earlier run, skipped")
        return
    print(f"\n[demo] {name}: jetfast {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    code = main(argv)
    if code == 130:
        raise KeyboardInterrupt
    if code:
        raise UserError(f"the {name} stage failed (exit {code}); fix the cause and run the demo again to continue")
    seconds = time.perf_counter() - start
    log[name] = round(seconds, 1)
    marker.write_text(f"{seconds:.1f} s\n")
    print(f"[demo] {name}: {seconds:.0f} s", flush=True)


def run_demo(args: argparse.Namespace) -> int:
    from jetfast.errors import InvalidArgument

    for option, value in PRESETS[args.preset].items():
        if getattr(args, option) is None:
            setattr(args, option, value)
    for option in ("jets", "generate", "vae_epochs", "gpt_epochs", "latent_dim", "bins"):
        if getattr(args, option) < 1:
            raise InvalidArgument(f"--{option.replace('_', '-')} must be at least 1; got {getattr(args, option)}")
    out = Path(args.out)
    if args.restart and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    d_model, heads, layers = args.gpt_size
    data, run_dir, codes = out / "jets.h5", out / "run", out / "codes.h5"
    generated, report = out / "generated.h5", out / "report"
    like, like_report = out / "generated_like_test.h5", out / "report_like_test"
    seed = str(args.seed)
    workers = ["--workers", str(args.workers)] if args.workers else []
    log: dict[str, float] = {}
    start = time.perf_counter()
    _stage(out, "data", ["data", "generate", "--n", str(args.jets), "--out", str(data), "--seed", seed, "--overwrite", *workers], log)
    _stage(out, "train-vae", ["train-vae", "--data", str(data), "--out", str(run_dir), "--epochs", str(args.vae_epochs),
                              "--latent-dim", str(args.latent_dim), "--beta", str(args.beta), "--seed", seed,
                              "--overwrite"], log)
    _stage(out, "fit-bins", ["fit-bins", str(run_dir), "--data", str(data), "--num-bins", str(args.bins), "--seed", seed], log)
    _stage(out, "encode", ["encode", str(run_dir), "--data", str(data), "--out", str(codes), "--overwrite"], log)
    _stage(out, "train-gpt", ["train-gpt", str(run_dir), "--codes", str(codes), "--epochs", str(args.gpt_epochs),
                              "--batch-size", "64", "--d-model", str(d_model), "--n-heads", str(heads), "--n-layers", str(layers),
                              "--seed", seed, "--overwrite"], log)
    _stage(out, "generate", ["generate", str(run_dir), "--n", str(args.generate), "--out", str(generated),
                             "--seed", seed, "--overwrite"], log)
    _stage(out, "evaluate", ["evaluate", "--real", str(data), "--gen", str(generated), "--run", str(run_dir),
                             "--out", str(report), "--seed", seed], log)
    # Test jets may lie a little outside the training jets' pT and mass range: ask for them all the same.
    _stage(out, "generate-like", ["generate", str(run_dir), "--like", str(data), "--like-split", "test", "--out", str(like),
                                  "--allow-extrapolation", "--seed", seed, "--overwrite"], log)
    _stage(out, "evaluate-like", ["evaluate", "--real", str(data), "--gen", str(like), "--run", str(run_dir), "--no-ladder",
                                  "--out", str(like_report), "--seed", seed], log)
    total = time.perf_counter() - start
    timings = out / "timings.json"
    previous = json.loads(timings.read_text()) if timings.exists() else {}
    timings.write_text(json.dumps({**previous, **log}, indent=2) + "\n")
    print(f"\n[demo] finished in {total / 60:.1f} min (per stage: {timings})")
    print(f"[demo] the VAE run, bins and Transformer: {run_dir}/")
    print(f"[demo] generated jets: {generated}")
    print(f"[demo] the report: {report / 'report.md'}  (plots in {report / 'plots'})")
    print(f"[demo] the test jets generated from their class, pT and mass, and their detector response: "
          f"{like_report / 'report.md'}")
    return 0

