"""The fidelity ladder: where a trained run loses fidelity, one step of the pipeline at a time.

Every row is compared with the same held-out test jets (the run's ``split.npz``, key
``test``), by the same observables and the same tests:

0. ``real``: two random halves of the test jets against each other, the floor of every
   number below (at half the jets);
1. ``reconstruction``: every test jet encoded to its posterior mean ``mu`` and decoded
   (sampled from the observation model): what the VAE keeps of a jet;
2. ``bins``: the same latents quantized to their codes and dequantized first: what
   quantization costs;
3. ``prior``: latents drawn from the VAE's prior N(0, I), decoded (by a VAE conditioned on
   the jets, for the test jets' class, pT and mass, one draw per test jet): the generator the
   Transformer has to beat;
4. ``transformer``: the generated file (codes sampled by the Transformer, decoded).

Columns: the median and the worst Wasserstein distance over the noise floor
(:func:`~jetfast.evaluate.metrics.distance_table`), the classifier two-sample AUC, and the
Fréchet and kernel physics distances (:func:`~jetfast.evaluate.metrics.fpd`,
:func:`~jetfast.evaluate.metrics.kpd`). Each row also keeps every observable's distance over
the floor (``ratio``) and its mean over the real one (``mean_ratio``): the row where an
observable's number jumps is the stage that loses it.
"""

from __future__ import annotations

import numpy as np
import torch

from jetfast.bins import load_bins
from jetfast.data.loader import JetLoader
from jetfast.evaluate.metrics import (
    TooFewJets,
    classifier_two_sample_test,
    distance_table,
    features_matrix,
    fpd,
    kpd,
)
from jetfast.evaluate.reader import JetSample, collect_jets
from jetfast.models.vae import batch_conditions, load_vae, loader_keys, read_conditions
from jetfast.ops import dequantize, quantize
from jetfast.run import RunDir

ROWS = {
    "real": "real vs real (two halves of the test jets)",
    "reconstruction": "VAE reconstruction of the test jets (sampled decode of mu)",
    "bins": "the same through the bins (dequantized codes)",
    "prior": "VAE prior: z ~ N(0, I), decoded",
    "transformer": "Transformer samples, decoded (the generated file)",
}


def row_metrics(real: dict, other: dict, *, bootstrap: int, seed: int) -> dict:
    """The ladder's columns for one row: observables of the real and the compared jets."""
    table = distance_table(real, other, bootstrap=0, seed=seed)
    ratios = {k: d["ratio"] for k, d in table.items() if d["ratio"] is not None}
    worst = max(ratios, key=ratios.get) if ratios else None
    real_x, other_x = features_matrix(real), features_matrix(other)
    result = {
        "n": int(len(other_x)),
        "median_ratio": float(np.median(list(ratios.values()))) if ratios else None,
        "worst_observable": worst,
        "worst_ratio": ratios.get(worst),
        "ratio": ratios,
        "mean_ratio": {k: d["gen_mean"] / d["real_mean"] for k, d in table.items() if d["real_mean"]},
    }
    for name, test in (("c2st", lambda: classifier_two_sample_test(real_x, other_x, bootstrap=bootstrap, seed=seed)),
                       ("fpd", lambda: fpd(real_x, other_x, seed=seed)),
                       ("kpd", lambda: kpd(real_x, other_x, seed=seed))):
        try:
            result[name] = test()
        except TooFewJets as exc:
            result[name] = {"skipped": str(exc)}
    return result


def _halves(sample: JetSample, seed: int) -> tuple[dict, dict]:
    order = np.random.default_rng(seed).permutation(sample.n)
    a, b = order[: sample.n // 2], order[sample.n // 2 :]
    return ({k: v[a] for k, v in sample.observables.items()}, {k: v[b] for k, v in sample.observables.items()})


def model_samples(run_dir, data: str, real: JetSample, *, thresholds, seed: int = 0, batch_size: int = 256,
                  progress: bool = True, device=None) -> dict[str, JetSample]:
    """Rows 1-3 of the ladder: the run's VAE (and bins) applied to the jets of ``real`` (file rows
    ``real.ids`` of ``data``), and as many jets decoded from the prior."""
    run = RunDir(run_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, transform, config = load_vae(run.path, map_location=device)
    centers = None
    if run.bins_path.is_file():
        centers = torch.from_numpy(load_bins(run.bins_path)[0]).to(device)
    ids = np.sort(real.ids)
    labelled = real.labels is not None
    test_jets = read_conditions(data, ids) if config.conditioned else None

    def encoded(through_bins: bool, stream: int):
        done = 0
        with JetLoader(data, batch_size, indices=ids, shuffle=False, transform=None, rank=0, world_size=1,
                       keys=loader_keys(config, "X_jets", "y")) as loader, torch.inference_mode():
            for batch in loader:
                conditions = batch_conditions(batch, config)
                conditions = None if conditions is None else conditions.to(device)
                mu, _ = model.encode(transform.forward(batch["X_jets"].to(device)), conditions)
                z = dequantize(quantize(mu, centers), centers) if through_bins else mu
                images = model.images(z, transform, conditions, mode="sample", seed=seed + stream, start=done)
                done += len(z)
                yield images.cpu().numpy(), batch["y"].numpy().astype(np.int8) if labelled else None

    def prior():
        # A conditioned VAE decodes each prior draw for one of the test jets (y, pt, m0).
        generator = torch.Generator().manual_seed(seed + 3)
        with torch.inference_mode():
            for start in range(0, len(ids), batch_size):
                count = min(batch_size, len(ids) - start)
                z = torch.randn(count, config.latent_dim, generator=generator).to(device)
                jets = None if test_jets is None else test_jets[start : start + count]
                images = model.images(z, transform, None if jets is None else jets.to(device), mode="sample",
                                      seed=seed + 3, start=start)
                yield images.cpu().numpy(), None if jets is None else jets[:, 0].numpy().astype(np.int8)

    rows = {"reconstruction": (encoded(False, 1), labelled)}
    if centers is not None:
        rows["bins"] = (encoded(True, 2), labelled)
    rows["prior"] = (prior(), test_jets is not None and labelled)
    return {name: collect_jets(batches, len(ids), name=f"{run.path} ({name})", labelled=with_labels,
                               thresholds=thresholds, seed=seed, progress=progress, desc=name)
            for name, (batches, with_labels) in rows.items()}


def ladder(real: JetSample, rows: dict[str, JetSample], *, bootstrap: int = 50, seed: int = 0) -> list[dict]:
    """The ladder table: row 0 (real halves) and one row per sample in ``rows`` (names of :data:`ROWS`)."""
    half_a, half_b = _halves(real, seed)
    table = [{"row": "real", "what": ROWS["real"], **row_metrics(half_a, half_b, bootstrap=bootstrap, seed=seed)}]
    for name in ROWS:
        if name in rows:
            table.append({"row": name, "what": ROWS[name],
                          **row_metrics(real.observables, rows[name].observables, bootstrap=bootstrap, seed=seed)})
    return table
