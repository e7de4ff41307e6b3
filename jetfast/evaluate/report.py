"""``jetfast evaluate``: compare generated jets with real ones and write a physics report.

Both files are streamed in chunks (:mod:`.reader`; memory stays bounded for 100k+ jets); every
jet goes through :func:`jetfast.evaluate.observables.compute_observables`, the same function for
real and generated jets; the plots are :mod:`.plots`', the page and its Markdown :mod:`.render`'s.
The output directory explains itself::

    OUT/
      report.html     self-contained page (plots embedded), the thing to open
      report.md       the same report in Markdown, linking plots/*.png
      metrics.json    every number of the report (distances, floors, AUCs, counts, options)
      plots/          observables.png, classes.png (quark vs gluon), mean_images.png,
                      jets_real.png, jets_generated.png, radial_profile.png, pixel_spectrum.png;
                      response.png, response_bins.png, pt_spectrum.png (with a response)

metrics.json keys: ``real``/``gen`` (paths, jets used), ``options``, ``notes``,
``summary`` (median distance/floor ratio, farthest observable), ``distances`` and
``distances_by_class`` (see :func:`jetfast.evaluate.metrics.distance_table`), ``c2st``,
``c2st_cnn`` (with ``--cnn``), ``fpd``, ``kpd``, ``quark_gluon``, ``ladder`` (with a run: one
entry per row of :mod:`jetfast.evaluate.ladder`), ``radial_profile``, ``response`` (see below),
``plots``, ``timing_s``. A test that could not run holds ``{"skipped": "<why>"}`` instead of numbers.

When the generated file holds ``pt_gen`` (the pT its jets were asked for), ``response`` is the
detector response per bin of generator-level pT, real jets binned in their file's ``pt``
(:func:`jetfast.evaluate.response.detector_response`); it is skipped, saying why, when the real
file has no ``pt``, and absent when the generated file has no ``pt_gen``.

Real jets are the held-out test split of a training run when ``--run`` is given (its
``split.npz``, key ``test``), otherwise all jets of ``--real``. A file with jets that break the
data contract (NaN, infinite, negative or absurdly large pixels) is refused, naming the jets.
Files are written to ``*.tmp`` first and renamed, so a crash never leaves half a report.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

from jetfast.data.format import CHANNELS, CLASS_NAMES
from jetfast.errors import InvalidArgument
from jetfast.evaluate.metrics import (
    TooFewJets,
    classifier_two_sample_test,
    cnn_two_sample_test,
    distance_table,
    features_matrix,
    fpd,
    kpd,
    quark_gluon_transfer,
)
from jetfast.evaluate.observables import DEFAULT_THRESHOLDS, PROFILE_EDGES
from jetfast.evaluate.plots import (
    plot_classes,
    plot_jets,
    plot_ladder_jets,
    plot_mean_images,
    plot_observables,
    plot_pixel_spectrum,
    plot_pt_spectrum,
    plot_radial_profile,
    plot_response,
    plot_response_histograms,
)
from jetfast.evaluate.ladder import ROWS, ladder, model_samples
from jetfast.evaluate.reader import DEFAULT_CHUNK_JETS, read_jets
from jetfast.evaluate.render import fmt, json_ready, plus_minus, render
from jetfast.evaluate.response import (
    DEFAULT_PT_EDGES,
    GEN_REQUESTED,
    REAL_REQUESTED,
    UNLIKE_SPECTRUM_RATIO,
    check_edges,
    detector_response,
)
from jetfast.run import RunDir, atomic_write


def _distance_rows(table: dict) -> list[list[str]]:
    return [
        [name, plus_minus(d["w"], d["w_err"]), fmt(d["w_norm"]), plus_minus(d["w_half"], d["w_half_err"]),
         plus_minus(d["floor"], d["floor_err"]), fmt(d["ratio"], 2), fmt(d["real_mean"]), fmt(d["gen_mean"])]
        for name, d in table.items()
    ]


QUARK_GLUON_TRAIN_JETS = 5_000  # the run's training jets the quark/gluon classifier learns from, at most
LADDER_HEADER = ["row", "jets", "median W/floor", "worst W/floor", "classifier AUC", "FPD", "KPD", "quark/gluon AUC"]
LADDER_TEXT = (
    "Each row is compared with the same held-out test jets by the same observables: the median and the worst "
    "Wasserstein distance over the noise floor (1 = as close as two real samples), the ROC AUC of a classifier "
    "telling the row's jets from real ones (0.5 = indistinguishable), and the Fréchet and kernel physics "
    "distances of JetNet over the observables (0 for identical distributions; the real row shows their noise at "
    "half the jets), and the quark/gluon AUC of a classifier trained on the run's real training jets, on the row's "
    "jets labelled with the class they stand for (row 0: all the test jets; — where the row has no class). Where a row is "
    "worse than the one above, that stage loses fidelity."
)


def _measure(entry: dict) -> str:
    return "—" if "skipped" in entry else plus_minus(entry["value"], entry["err"])


def _ladder_quark_gluon(table: list[dict], qg: dict) -> None:
    """Each ladder row's quark/gluon AUC under the classifier trained on real jets: row 0 is its AUC on
    held-out real jets, the others their jets labelled with the class they were encoded or drawn for."""
    for r in table:
        if r["row"] == "real":
            r["quark_gluon"] = {"auc": qg["auc_real"], "auc_err": qg["auc_real_err"]}
        elif r["row"] == "transformer":
            r["quark_gluon"] = {"auc": qg["auc_gen"], "auc_err": qg["auc_gen_err"]}
        elif r["row"] in qg["auc_others"]:
            r["quark_gluon"] = qg["auc_others"][r["row"]]


def _quark_gluon_training_jets(run_dir, real_path, thresholds, seed: int, chunk_jets: int, progress: bool):
    """(features, labels) of up to :data:`QUARK_GLUON_TRAIN_JETS` of the run's training jets, which
    the quark/gluon classifier learns from: thousands of jets rather than half of the test jets, so
    its AUCs differ by what the scored jets hold, not by how the classifier came out. None when the
    split has no training jets."""
    from jetfast.run import load_split

    rows = load_split(run_dir).get("train")
    if rows is None or len(rows) == 0:
        return None
    jets = read_jets(real_path, np.sort(rows), max_jets=QUARK_GLUON_TRAIN_JETS, thresholds=thresholds, seed=seed + 2,
                     chunk_jets=chunk_jets, progress=progress, desc="training jets (quark/gluon classifier)")
    return (features_matrix(jets.observables), jets.labels) if jets.labels is not None else None


def _ladder_rows(table: list[dict]) -> list[list[str]]:
    rows = []
    for i, r in enumerate(table):
        c2st, qg = r["c2st"], r.get("quark_gluon", {"skipped": "no labels"})
        rows.append([
            f"{i}. {r['what']}", str(r["n"]), fmt(r["median_ratio"], 2),
            f"{fmt(r['worst_ratio'], 2)} ({r['worst_observable']})" if r["worst_observable"] else "—",
            "—" if "skipped" in c2st else plus_minus(c2st["auc"], c2st["auc_err"]),
            _measure(r["fpd"]), _measure(r["kpd"]),
            "—" if "skipped" in qg else plus_minus(qg["auc"], qg["auc_err"]),
        ])
    return rows


def _ladder_observables(table: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Observables x rows: W/floor and, in brackets, the row's mean over the real one."""
    header = ["observable"] + [f"{i}. {r['row']}" for i, r in enumerate(table)]
    names = [name for name in table[-1]["mean_ratio"] if any(name in r.get("ratio", {}) for r in table)]
    rows = []
    for name in names:
        cells = [name]
        for r in table:
            ratio, mean = r.get("ratio", {}).get(name), r["mean_ratio"].get(name)
            cells.append("—" if ratio is None else f"{fmt(ratio, 2)} ({fmt(mean, 3)})")
        rows.append(cells)
    return header, rows


LADDER_OBSERVABLES_TEXT = (
    "Every observable's W/floor in every row of the ladder, and in brackets the row's mean over the real mean: "
    "the row where an observable's number jumps is the stage that loses it."
)

DISTANCE_HEADER = ["observable", "W(real, gen)", "W / σ_real", "W(half, gen)", "floor W(half, half)",
                   "ratio", "mean real", "mean gen"]


def _c2st_verdict(auc: float, err: float) -> str:
    excess = abs(auc - 0.5) / err if err and math.isfinite(err) and err > 0 else float("inf")
    if excess < 2:
        return "consistent with 0.5: the classifier cannot tell generated from real jets"
    if auc < 0.6:
        return "slightly above 0.5: small but significant differences"
    if auc < 0.8:
        return "clearly above 0.5: the classifier separates real from generated jets"
    return "far above 0.5: generated jets are easy to tell from real ones"


def evaluate(
    real_path,
    gen_path,
    out_dir,
    *,
    real_indices=None,
    max_jets: int | None = None,
    thresholds=DEFAULT_THRESHOLDS,
    bootstrap: int = 50,
    seed: int = 0,
    plots: bool = True,
    progress: bool = True,
    chunk_jets: int = DEFAULT_CHUNK_JETS,
    real_note: str = "",
    cnn: bool = False,
    run_dir=None,
    pt_edges=DEFAULT_PT_EDGES,
) -> dict:
    """Compare generated jets with real ones; write report.md/html, metrics.json, plots/; return the metrics.

    ``real_indices`` selects real jets (e.g. a test split); ``max_jets`` caps each side with
    a random subset; ``thresholds`` are the pixel thresholds (GeV) of the multiplicities;
    ``cnn`` adds the image-level two-sample test (a small CNN, torch; slower). With ``run_dir``,
    the run the jets were generated from (and whose test jets are the real ones), the report
    adds its fidelity ladder (:mod:`jetfast.evaluate.ladder`): the same comparison for the VAE's
    reconstructions, the reconstructions through the bins and its prior samples. ``pt_edges``
    (GeV) bin the detector response when the generated file carries ``pt_gen``.
    """
    t0 = time.perf_counter()
    if max_jets is not None and max_jets < 2:
        raise InvalidArgument(f"max_jets must be at least 2; got {max_jets}")
    if bootstrap < 0:
        raise InvalidArgument(f"bootstrap must be >= 0; got {bootstrap}")
    thresholds = tuple(float(t) for t in thresholds)
    if len(thresholds) != 3 or min(thresholds) < 0:
        raise InvalidArgument(f"thresholds must be 3 non-negative numbers (Tracks, ECAL, HCAL); got {thresholds}")
    pt_edges = check_edges(pt_edges)
    out_dir = Path(out_dir)
    keep_coarse = 10_000 if cnn else 0
    real = read_jets(real_path, real_indices, max_jets=max_jets, thresholds=thresholds, seed=seed,
                     chunk_jets=chunk_jets, progress=progress, desc="real jets", keep_coarse=keep_coarse)
    gen = read_jets(gen_path, None, max_jets=max_jets, thresholds=thresholds, seed=seed + 1,
                    chunk_jets=chunk_jets, progress=progress, desc="generated jets", keep_coarse=keep_coarse)
    t_read = time.perf_counter() - t0

    metrics = {
        "real": {"path": os.path.abspath(real.path), "n_file": real.n_file, "n_used": real.n,
                 "selection": real_note or "all jets"},
        "gen": {"path": os.path.abspath(gen.path), "n_file": gen.n_file, "n_used": gen.n},
        "options": {"max_jets": max_jets, "thresholds_gev": dict(zip(CHANNELS, thresholds)), "bootstrap": bootstrap,
                    "seed": seed, "profile_edges": PROFILE_EDGES, "pt_edges": pt_edges},
        "notes": real.notes + gen.notes,
    }
    metrics["distances"] = distance_table(real.observables, gen.observables, bootstrap=bootstrap, seed=seed)
    with_classes = real.labels is not None and gen.labels is not None
    metrics["distances_by_class"] = {}
    if with_classes:
        for cls, name in CLASS_NAMES.items():
            r_mask, g_mask = real.labels == cls, gen.labels == cls
            try:
                metrics["distances_by_class"][name] = distance_table(
                    {k: v[r_mask] for k, v in real.observables.items()},
                    {k: v[g_mask] for k, v in gen.observables.items()}, bootstrap=bootstrap, seed=seed)
            except TooFewJets as exc:
                metrics["notes"].append(f"{name} distances skipped: {exc}")

    ratios = {k: d["ratio"] for k, d in metrics["distances"].items() if d["ratio"] is not None}
    worst = max(ratios, key=ratios.get) if ratios else None
    metrics["summary"] = {
        "median_ratio": float(np.median(list(ratios.values()))) if ratios else None,
        "worst_observable": worst,
        "worst_ratio": ratios.get(worst),
    }

    if GEN_REQUESTED in gen.scalars and REAL_REQUESTED in real.scalars:
        metrics["response"] = detector_response(real, gen, edges=pt_edges, bootstrap=bootstrap, seed=seed)
        metrics["notes"] += metrics["response"]["notes"]
    elif GEN_REQUESTED in gen.scalars:
        metrics["response"] = {"skipped": f"{real.path} has no generator-level {REAL_REQUESTED!r} to compare the "
                                          f"generated jets' {GEN_REQUESTED!r} with"}
    with_response = "bins" in metrics.get("response", {})

    metrics["radial_profile"] = {"edges": PROFILE_EDGES, "real_mean": real.profile.mean(0),
                                 "gen_mean": gen.profile.mean(0)}

    real_x, gen_x = features_matrix(real.observables), features_matrix(gen.observables)
    for name, test in (("c2st", lambda: classifier_two_sample_test(real_x, gen_x, bootstrap=bootstrap, seed=seed)),
                       ("fpd", lambda: fpd(real_x, gen_x, seed=seed)), ("kpd", lambda: kpd(real_x, gen_x, seed=seed))):
        try:
            metrics[name] = test()
        except TooFewJets as exc:
            metrics[name] = {"skipped": str(exc)}
    rows = {}
    if run_dir is not None and not RunDir(run_dir).checkpoint("best").is_file():
        metrics["notes"].append(f"{run_dir} holds no trained VAE (checkpoints/best.pt): the fidelity ladder is skipped")
    elif run_dir is not None:
        rows = model_samples(run_dir, real_path, real, thresholds=thresholds, seed=seed, progress=progress)
        metrics["ladder"] = ladder(real, {**rows, "transformer": gen}, bootstrap=bootstrap, seed=seed)
    if cnn:
        try:
            metrics["c2st_cnn"] = cnn_two_sample_test(real.coarse, gen.coarse, bootstrap=bootstrap, seed=seed)
        except TooFewJets as exc:
            metrics["c2st_cnn"] = {"skipped": str(exc)}
    if with_classes:
        try:
            others = {name: (features_matrix(sample.observables), sample.labels)
                      for name, sample in rows.items() if sample.labels is not None}
            train = _quark_gluon_training_jets(run_dir, real_path, thresholds, seed, chunk_jets, progress) if rows else None
            metrics["quark_gluon"] = quark_gluon_transfer(real_x, real.labels, gen_x, gen.labels, bootstrap=bootstrap,
                                                          seed=seed, others=others, train=train)
            _ladder_quark_gluon(metrics.get("ladder", []), metrics["quark_gluon"])
        except TooFewJets as exc:
            metrics["quark_gluon"] = {"skipped": str(exc)}
    else:
        metrics["quark_gluon"] = {"skipped": "needs labels y in both files"}

    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    images: dict[str, Path | None] = {}
    t_plots = time.perf_counter()
    if plots:
        images["observables"] = plot_observables(real, gen, plot_dir / "observables.png")
        if with_classes:
            images["classes"] = plot_classes(real, gen, plot_dir / "classes.png")
        images["radial_profile"] = plot_radial_profile(real, gen, plot_dir / "radial_profile.png")
        images["pixel_spectrum"] = plot_pixel_spectrum(real, gen, plot_dir / "pixel_spectrum.png")
        images["mean_images"] = plot_mean_images(real, gen, plot_dir / "mean_images.png")
        images["jets_real"] = plot_jets(real, plot_dir / "jets_real.png", "real")
        images["jets_generated"] = plot_jets(gen, plot_dir / "jets_generated.png", "generated")
        if with_response:
            images["response"] = plot_response(metrics["response"], plot_dir / "response.png")
            images["response_bins"] = plot_response_histograms(real, gen, metrics["response"],
                                                               plot_dir / "response_bins.png")
            images["pt_spectrum"] = plot_pt_spectrum(real, gen, metrics["response"], plot_dir / "pt_spectrum.png")
        if rows:
            images["ladder_jets"] = plot_ladder_jets(
                [(ROWS["real"].split(" (")[0], real), *((ROWS[k], rows[k]) for k in rows), (ROWS["transformer"], gen)],
                plot_dir / "ladder_jets.png")
    metrics["plots"] = {k: v.relative_to(out_dir).as_posix() for k, v in images.items() if v is not None}
    metrics["timing_s"] = {"read": t_read, "plots": time.perf_counter() - t_plots, "total": time.perf_counter() - t0}

    sections = _report_sections(metrics, images)
    md, page = render(sections, out_dir, "jetfast evaluation: generated vs real jets")
    atomic_write(out_dir / "metrics.json", json.dumps(json_ready(metrics), indent=2) + "\n")
    atomic_write(out_dir / "report.md", md)
    atomic_write(out_dir / "report.html", page)
    return metrics


def _report_sections(m: dict, images: dict) -> list[dict]:
    real, gen = m["real"], m["gen"]
    thresholds = ", ".join(f"{k} {v:g}" for k, v in m["options"]["thresholds_gev"].items())
    summary = [
        f"Real: `{real['path']}` — {real['n_used']} jets ({real['selection']}).",
        f"Generated: `{gen['path']}` — {gen['n_used']} jets.",
        f"Pixel thresholds for multiplicities (GeV): {thresholds}. Bootstrap replicas: {m['options']['bootstrap']}.",
    ] + [f"Note: {n}" for n in m["notes"]]
    sections = [{"heading": "Samples", "text": summary}]
    if "ladder" in m:
        sections.append({"heading": "Fidelity ladder", "text": [LADDER_TEXT], "table": (LADDER_HEADER, _ladder_rows(m["ladder"])),
                         "images": [images.get("ladder_jets")]})
        sections.append({"heading": "Fidelity ladder by observable", "text": [LADDER_OBSERVABLES_TEXT],
                         "table": _ladder_observables(m["ladder"])})

    c2st = m["c2st"]
    if "skipped" in c2st:
        c2st_text = [f"Skipped: {c2st['skipped']}"]
    else:
        c2st_text = [
            f"ROC AUC = **{plus_minus(c2st['auc'], c2st['auc_err'])}** ({c2st['n_per_side']} jets per side, "
            f"{c2st['folds']}-fold out-of-fold scores; per-fold AUCs "
            f"{', '.join(fmt(a) for a in c2st['fold_aucs'])}) — {_c2st_verdict(c2st['auc'], c2st['auc_err'])}.",
            "A gradient-boosted classifier is trained to tell real from generated jets using the observables "
            "below; 0.5 means it cannot, 1.0 means it always can.",
        ]
    cnn = m.get("c2st_cnn")
    if cnn is not None and "skipped" in cnn:
        c2st_text.append(f"Image CNN test skipped: {cnn['skipped']}")
    elif cnn is not None:
        c2st_text.append(
            f"Image-level test: a small CNN on 25x25 tower-summed images ({cnn['n_per_side']} jets per side, "
            f"{cnn['n_test']} held out) reaches ROC AUC = **{plus_minus(cnn['auc'], cnn['auc_err'])}** — "
            f"{_c2st_verdict(cnn['auc'], cnn['auc_err'])}."
        )
    sections.append({"heading": "Classifier two-sample test", "text": c2st_text})

    qg = m["quark_gluon"]
    if "skipped" in qg:
        qg_text = [f"Skipped: {qg['skipped']}"]
    else:
        qg_text = [
            f"Quark/gluon AUC on held-out real jets: **{plus_minus(qg['auc_real'], qg['auc_real_err'])}**; "
            f"on generated jets (labelled with the class asked for): **{plus_minus(qg['auc_gen'], qg['auc_gen_err'])}**.",
            f"The classifier is trained on {qg['n_train']} real jets ("
            + ("the run's training jets" if qg.get("trained_on") == "given" else "half of the real jets, scored on the other half")
            + "). Similar AUCs mean the generated jets "
            "carry the class information of real ones; a lower generated AUC means the classes were washed out.",
        ]
    sections.append({"heading": "Quark/gluon classifier trained on real jets", "text": qg_text})

    explain = (
        "W is the 1-D Wasserstein distance (units of the observable) with its bootstrap error; W/σ_real divides "
        "it by the real standard deviation to compare observables. The noise floor is W between two disjoint "
        "random halves of the real jets; W(half, gen) compares one of these halves with as many generated jets "
        "as the other half holds, so ratio = W(half, gen) / floor is fair: about 1 for a perfect generator, "
        "larger is worse. Both are means over random splits (one split's W wanders by 20-50%); their errors "
        "are those of one split, larger than those of the means."
    )
    summary = m["summary"]
    headline = (
        f"Median distance / noise floor over the observables: **{fmt(summary['median_ratio'], 2)}** "
        f"(1 = as close as two real samples); farthest: `{summary['worst_observable']}` "
        f"at {fmt(summary['worst_ratio'], 2)}."
    ) if summary["median_ratio"] is not None else "No noise floor could be measured."
    sections.append({"heading": "Observables: distances and noise floor", "text": [headline, explain],
                     "table": (DISTANCE_HEADER, _distance_rows(m["distances"])),
                     "images": [images.get("observables")]})
    if "response" in m:
        sections.append(_response_section(m["response"], images))
    for name, table in m["distances_by_class"].items():
        sections.append({"heading": f"Observables: {name} jets only", "table": (DISTANCE_HEADER, _distance_rows(table)),
                         })
    if images:
        sections.append({"heading": "Plots", "images": [images.get(k) for k in (
            "classes", "radial_profile", "pixel_spectrum", "mean_images", "jets_real", "jets_generated")]})
    return sections


RESPONSE_HEADER = ["generator-level pT [GeV]", "n real", "n gen", "mean real", "mean gen", "width real", "width gen",
                   "W / floor", "mean within 2σ", "width within 2σ"]


def _flag(value) -> str:
    return "—" if value is None else ("yes" if value else "**no**")


def _response_rows(response: dict) -> list[list[str]]:
    rows = []
    for b in response["bins"]:
        real, gen = b["real"], b["gen"]
        rows.append([
            f"{b['lo']:g}–{b['hi']:g}" + ("" if b["enough"] else " (too few jets)"), str(real["n"]), str(gen["n"]),
            plus_minus(real["mean"], real["mean_err"]), plus_minus(gen["mean"], gen["mean_err"]),
            plus_minus(real["width"], real["width_err"]), plus_minus(gen["width"], gen["width_err"]),
            fmt(b["ratio"], 2), _flag(b["mean_within_2sigma"]), _flag(b["width_within_2sigma"]),
        ])
    return rows


def _response_headline(response: dict) -> str:
    s = response["summary"]
    judged = s["bins_judged"]
    if judged == 0:
        return (f"No bin of generator-level pT holds {response['min_jets']} jets on both sides: the response is shown "
                "but not judged.")
    if s["all_within_2sigma"] is None:
        verdict = "without bootstrap errors the means and widths are not judged"
    elif s["all_within_2sigma"]:
        verdict = "generated mean and width **within 2σ** of the real ones in every bin"
    else:
        verdict = (f"generated mean within 2σ of the real one in **{s['mean_bins_within']} of {judged}** bins, "
                   f"width in **{s['width_bins_within']} of {judged}**")
    worst = s["max_ratio_bin"]
    farthest = (f"; largest W/floor {fmt(s['max_ratio'], 2)} at {worst[0]:g}–{worst[1]:g} GeV"
                if worst is not None else "")
    return f"{judged} bins with at least {response['min_jets']} jets per side: {verdict}{farthest}."


def _response_section(response: dict, images: dict) -> dict:
    heading = "Detector response: image pT / generator-level pT"
    if "skipped" in response:
        return {"heading": heading, "text": [f"Skipped: {response['skipped']}"]}
    n, outside = response["n"], response["outside"]
    text = [
        _response_headline(response),
        "The response is a jet's image pT (the observable `pt`, calorimeter pixels) over its generator-level pT: "
        f"the file's `{response['requested']['real']}` for real jets and, for generated ones, the "
        f"`{response['requested']['gen']}` the generator was asked for; jets are binned in that generator-level pT. "
        "Its mean is the energy scale of the images, its width (standard deviation) their pT resolution; errors "
        "are bootstrap standard deviations, and 'within 2σ' compares the generated value with the real one by "
        "their combined error. W / floor is the Wasserstein distance of the two response distributions over that "
        "of two halves of the real jets (about 1 for a perfect generator). "
        f"Bins with fewer than {response['min_jets']} jets on either side are shown but not judged.",
        f"Jets inside the bins: {n['real']} real, {n['gen']} generated; outside them: {outside['real']} real, "
        f"{outside['gen']} generated.",
    ]
    spectrum = response.get("requested_spectrum", {})
    if spectrum.get("unlike_real"):
        text.append(
            f"The requested pT spectrum is unlike the real jets' (W/floor {fmt(spectrum['ratio'], 2)} > "
            f"{UNLIKE_SPECTRUM_RATIO:g}; mean {fmt(spectrum['gen_mean'])} against {fmt(spectrum['real_mean'])} GeV): "
            "whole-sample distances of pT, mass and the channel sums compare different jets. Judge those by the "
            "response per bin and by the spectra below."
        )
    return {"heading": heading, "text": text, "table": (RESPONSE_HEADER, _response_rows(response)),
            "images": [images.get(k) for k in ("response", "response_bins", "pt_spectrum")]}
