"""``jetfast evaluate``: compare generated jets with real ones and write a physics report
(:func:`jetfast.evaluate.report.evaluate`)."""

from __future__ import annotations

import argparse
import sys

# jetfast.evaluate.observables.DEFAULT_THRESHOLDS, spelled here so that --help does not import
# NumPy (a test checks they agree): pixel thresholds in GeV of Tracks, ECAL, HCAL.
DEFAULT_THRESHOLDS = (1e-3, 1e-3, 4e-5)
# jetfast.evaluate.response.DEFAULT_PT_EDGES, likewise: bins of generator-level pT in GeV.
DEFAULT_PT_EDGES = (70.0, 80.0, 90.0, 100.0, 115.0, 135.0, 160.0, 200.0)


def evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--real", metavar="FILE",
                        help="real jets (HDF5, ML4SCI layout; default with --run: the run's training data file)")
    parser.add_argument("--gen", required=True, metavar="FILE", help="generated jets (HDF5, same layout)")
    parser.add_argument("--out", metavar="DIR",
                        help="output directory (default with --run: RUN_DIR/eval/<name of --gen>)")
    parser.add_argument("--run", metavar="RUN_DIR",
                        help="training run whose split.npz 'test' jets are the real sample (default: all real jets)")
    parser.add_argument("--max-jets", type=int, metavar="N", help="use at most N random jets from each file")
    parser.add_argument("--threshold", type=float, nargs=3, metavar=("TRACKS", "ECAL", "HCAL"),
                        default=DEFAULT_THRESHOLDS,
                        help="pixel thresholds in GeV for the multiplicities (default: %(default)s; "
                             "HCAL pixels are towers/25, so 4e-5 is a 1e-3 GeV tower)")
    parser.add_argument("--pt-edges", type=float, nargs="+", default=DEFAULT_PT_EDGES, metavar="GEV",
                        help="bin edges of generator-level pT for the detector response, used when --gen holds the "
                             "requested pt_gen (default: %(default)s)")
    parser.add_argument("--bootstrap", type=int, default=50, metavar="B",
                        help="bootstrap replicas for the errors (default: %(default)s; 0 = no errors)")
    parser.add_argument("--seed", type=int, default=0, help="seed of subsampling, halves and classifiers")
    parser.add_argument("--cnn", action="store_true",
                        help="add an image-level two-sample test: a small CNN on 25x25 tower-summed images "
                             "(torch; about a minute on 2 cores)")
    parser.add_argument("--no-ladder", action="store_true",
                        help="with --run, skip the fidelity ladder (the run's VAE reconstructions, the same through "
                             "the bins and its prior samples, each compared with the test jets like --gen)")
    parser.add_argument("--no-plots", action="store_true", help="write numbers only (faster)")


def run_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jetfast.errors import InvalidArgument, RunDirError
    from jetfast.evaluate.render import plus_minus
    from jetfast.evaluate.report import evaluate
    from jetfast.run import RunDir, load_split

    if args.out is None and args.run is None:
        raise InvalidArgument("give --out DIR (or --run RUN_DIR to write into RUN_DIR/eval/)")
    out = Path(args.out) if args.out else RunDir(args.run).eval_dir / Path(args.gen).stem
    if args.run:
        run = RunDir(args.run)
        real = run.data_file(args.real, option="--real")
        split = load_split(run)
        if "test" not in split:
            raise RunDirError(f"{run.split_path} has no 'test' indices (keys: {sorted(split)})")
        indices = split["test"]
        note = f"test split of {args.run} ({len(indices)} jets)"
    else:
        if args.real is None:
            raise InvalidArgument("give --real FILE (or --run RUN_DIR of a run whose config.json names its data file)")
        real, indices, note = args.real, None, "all jets"
        print("jetfast evaluate: no --run given, so every real jet is used; real jets a model was trained "
              "on flatter it — pass --run RUN_DIR to use its held-out test split", file=sys.stderr)
    metrics = evaluate(real, args.gen, out, real_indices=indices, max_jets=args.max_jets, thresholds=args.threshold,
                       bootstrap=args.bootstrap, seed=args.seed, plots=not args.no_plots, real_note=note, cnn=args.cnn,
                       run_dir=args.run if args.run and not args.no_ladder else None, pt_edges=args.pt_edges)
    c2st = metrics["c2st"]
    if "auc" in c2st:
        print(f"classifier two-sample AUC: {plus_minus(c2st['auc'], c2st['auc_err'])} (0.5 = indistinguishable)")
    if "auc" in metrics.get("c2st_cnn", {}):
        print(f"image CNN two-sample AUC: {plus_minus(metrics['c2st_cnn']['auc'], metrics['c2st_cnn']['auc_err'])}")
    summary = metrics["summary"]
    if summary["median_ratio"] is not None:
        print(f"median distance / noise floor: {summary['median_ratio']:.2f} (1 = as close as two real samples); "
              f"farthest: {summary['worst_observable']} at {summary['worst_ratio']:.2f}")
    if "response" in metrics:
        print(_response_line(metrics["response"]))
    for i, row in enumerate(metrics.get("ladder", [])):
        auc = row["c2st"].get("auc")
        print(f"  ladder {i}. {row['row']:<15} median W/floor {row['median_ratio']:.2f}  worst {row['worst_ratio']:.2f} "
              f"({row['worst_observable']})  AUC {'—' if auc is None else f'{auc:.3f}'}")
    print(f"report: {out / 'report.html'}  (also report.md, metrics.json, plots/)")
    return 0


def _response_line(response: dict) -> str:
    if "skipped" in response:
        return f"detector response skipped: {response['skipped']}"
    s, judged = response["summary"], response["summary"]["bins_judged"]
    line = f"detector response (image pT / generator-level pT), {judged} of {len(response['bins'])} pT bins judged: "
    if judged == 0:
        return line + f"none holds {response['min_jets']} jets per side"
    if s["all_within_2sigma"] is None:
        line += "no bootstrap errors to judge by"
    else:
        line += f"mean within 2σ of real in {s['mean_bins_within']}, width in {s['width_bins_within']}"
    if s["max_ratio_bin"] is not None:
        lo, hi = s["max_ratio_bin"]
        line += f"; max W/floor {s['max_ratio']:.2f} ({lo:g}-{hi:g} GeV)"
    return line
