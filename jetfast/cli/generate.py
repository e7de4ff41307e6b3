"""``jetfast generate``: sample new jets from a trained run (:func:`jetfast.generation.writer.generate`)."""

from __future__ import annotations

import argparse

from jetfast.cli.options import torch_device

GENERATE_EPILOG = (
    "Under torchrun (torchrun --nproc-per-node W -m jetfast.cli generate RUN --num-jets N --out OUT), each rank "
    "writes OUT.rank{r}-of-{W}.h5 and rank 0 writes OUT as a virtual dataset over them."
)


# jetfast.generation.conditions.CLASS_CHOICES, spelled here so that --help does not import torch.
CLASS_CHOICES = ("quark", "gluon", "mix", "unconditional")


def generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a trained run: VAE (train-vae), bins.npz (fit-bins) and gpt/ (train-gpt)")
    # --num-jets is the spelling to use under torchrun, whose own parser mistakes --n for its --nnodes/--nproc-per-node.
    parser.add_argument("--n", "--num-jets", dest="n", type=int, default=None,
                        help="number of jets to generate (in total, across ranks; with --like: default all its jets)")
    parser.add_argument("--out", required=True,
                        help="output HDF5 file, in the input layout (X_jets, y, pt, m0; pt and m0 computed from the "
                             "generated images), plus pt_gen and m0_gen, the generator-level jet each was made for")
    asked = parser.add_argument_group("what the jets are asked to be")
    asked.add_argument("--cls", choices=CLASS_CHOICES, default=None,
                       help="class of the jets: quark, gluon, a 50/50 mix, or unconditional (default: the --like jets' "
                            "class, else mix)")
    asked.add_argument("--pt", metavar="GEV", default=None,
                       help="generator-level jet pT: a value (150) or a range LO:HI drawn flat per jet (100:200)")
    asked.add_argument("--mass", metavar="GEV", default=None,
                       help="generator-level jet mass: a value or a range LO:HI (default: free; a VAE conditioned on "
                            "the jets takes it from training jets of that pT)")
    asked.add_argument("--like", metavar="FILE", default=None,
                       help="mirror the jets of FILE one to one: jet i is asked for the class y, pT pt and mass m0 "
                            "of its jet i (e.g. real test jets, or jets of another generator)")
    asked.add_argument("--like-split", choices=("train", "val", "test"), default=None,
                       help="with --like the run's data file: mirror only the jets of this split of the run")
    asked.add_argument("--allow-extrapolation", action="store_true",
                       help="generate at pT or mass outside the range of the training jets (refused otherwise)")
    parser.add_argument("--batch-size", type=int, default=256, help="jets per block (memory and resume granularity; default 256)")
    parser.add_argument("--seed", type=int, default=0, help="master seed (default 0); the same seed gives the same file")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.partial")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--decode", choices=("sample", "mean"), default="sample",
                        help="sample: draw every pixel's hit and intensity from the VAE's observation model (jets); "
                             "mean: its expected image (smooth, for studies). Default: sample")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: the Transformer's GEMMs and KV cache and the VAE decoder in bf16 (softmax, "
                             "logits and draws stay fp32), about twice the rate where the CPU or GPU has bf16 units "
                             "(AVX512-BF16, AMX, Ampere and later), slower where it has not. Default: fp32")
    parser.add_argument("--gpt-dir", default=None, help="Transformer run directory (default RUN_DIR/gpt)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most probable codes")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    parser.add_argument("--device", type=torch_device, default=None, help="cpu or cuda[:i] (default: cuda when available)")
    parser.epilog = GENERATE_EPILOG


def run_generate(args: argparse.Namespace) -> int:
    import os
    import time

    from jetfast.generation.writer import StageTimes, generate

    from jetfast.errors import InvalidArgument
    from jetfast.generation.conditions import parse_value_or_range

    kinematics = {name: parse_value_or_range(getattr(args, name), f"--{name}")
                  for name in ("pt", "mass") if getattr(args, name) is not None}
    like_rows = None
    if args.like_split is not None:
        if args.like is None:
            raise InvalidArgument("--like-split selects jets of the --like file: give --like FILE too")
        from jetfast.run import RunDir, load_split

        like_rows = load_split(RunDir(args.run_dir))[args.like_split]
    if args.n is None:
        if args.like is None:
            raise InvalidArgument("give the number of jets with --n (or --like FILE to mirror its jets)")
        from jetfast.generation.conditions import LikeJets

        args.n = len(LikeJets.read(args.like, like_rows).rows)
    sampling = {"temperature": args.temperature}
    if args.top_k is not None:
        sampling["top_k"] = args.top_k
    if args.top_p is not None:
        sampling["top_p"] = args.top_p
    start = time.perf_counter()
    times = StageTimes()
    out = generate(
        args.run_dir, args.n, args.out, cls=args.cls, like=args.like, like_rows=like_rows,
        allow_extrapolation=args.allow_extrapolation, **kinematics, batch_size=args.batch_size, seed=args.seed, resume=args.resume,
        overwrite=args.overwrite, decode=args.decode, precision=args.precision, gpt_dir=args.gpt_dir, device=args.device,
        times=times, **sampling,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        seconds = time.perf_counter() - start
        shares = ", ".join(f"{stage} {share:.0%}" for stage, share in times.shares().items())
        print(f"wrote {args.n} jets to {out} in {seconds:.1f} s ({args.n / seconds:.1f} jets/s; {shares})")
    return 0
