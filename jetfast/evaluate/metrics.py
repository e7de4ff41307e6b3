"""How close generated jets are to real ones: distances, their noise floor, classifier tests.

* :func:`wasserstein` — the 1-D Wasserstein (earth mover's) distance between two samples
  of one observable (``scipy.stats.wasserstein_distance``), with a bootstrap error.
* :func:`mean_and_width` — the mean and standard deviation of a sample, each with a
  bootstrap error drawn the way :func:`wasserstein` draws its own.
* :func:`distance_table` — that distance for every observable, beside its *noise floor*:
  the distance between two disjoint halves of the real sample. A finite sample of the very
  same distribution sits at a distance that shrinks only like 1/sqrt(n), so a distance is
  judged against the floor, not against zero. For a fair comparison the generated sample
  is compared with the same real half, at the size of the other real half:
  ``ratio = W(real_A, gen_k) / W(real_A, real_B_k)`` with ``k = min(|B|, n_gen)``;
  a perfect generator gives ``ratio ≈ 1``. One random split leaves each W with a spread
  of 20-50% of its value at a thousand jets, so both are averaged over ``splits`` random
  splits (new halves and new generated jets each time): the ratio of the two averages.
  The headline ``w`` uses all jets and is therefore smaller than ``w_half``; compare it
  with the floor only roughly.
* :func:`classifier_two_sample_test` — the ROC AUC of a gradient-boosted classifier that
  tries to tell real from generated jets from their observables (out-of-fold predictions
  of a stratified k-fold, equal class sizes); 0.5 means indistinguishable.
* :func:`cnn_two_sample_test` — the same question asked of the images by a small CNN on
  25x25 tower-summed images (optional: it needs torch and about a minute).
* :func:`quark_gluon_transfer` — a quark/gluon classifier trained on real jets, evaluated
  on held-out real jets and on generated jets labelled with the class they were asked
  for; similar AUCs mean the generator kept the class information.
* :func:`fpd` and :func:`kpd` — the Fréchet and kernel physics distances of JetNet
  (Kansal et al., arXiv:2211.10295, ``jetnet.evaluation.fpd/kpd``) over the observables:
  every feature divided by its largest |value| among the real jets, then the Fréchet
  distance of Gaussians fitted to samples of N jets, extrapolated to N -> infinity, and the
  unbiased MMD^2 with the kernel (x.y / d + 1)^4. JetNet's sizes (20k-50k and 5k jets) are
  cut to the jets at hand, which jetfast reports beside the values.
"""

from __future__ import annotations

import numpy as np

MIN_JETS_PER_SIDE = 30  # below this a trained classifier's AUC is mostly noise
BOOTSTRAP_BATCH = 16  # bootstrap replicas evaluated at once (memory ~ batch x n)
BOOTSTRAP_SIZE = 20_000  # larger samples are bootstrapped on a subsample, see wasserstein()
# Random half splits averaged in a noise floor: one split's W wanders by 20-50% of its value
# (measured on 1,200 test jets), the average of 32 by ~1/sqrt(32) of that.
FLOOR_SPLITS = 32


class TooFewJets(ValueError):
    """A metric needs more jets than were given."""


# -- Wasserstein distance ------------------------------------------------------------------------
def _bootstrap_wasserstein(u: np.ndarray, v: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """W1 of ``n_boot`` bootstrap resamples of (u, v), vectorised over the replicas.

    A resample of u is the original values with multinomial weights, so the empirical CDFs
    of all replicas live on the same sorted pooled values; W1 is the integral of
    |F_u - F_v| over that grid, exactly what scipy computes for one pair.
    """
    n, m = len(u), len(v)
    pooled = np.concatenate([u, v]).astype(np.float64)
    order = np.argsort(pooled, kind="stable")
    gaps = np.diff(pooled[order])  # (n + m - 1,)
    rank = np.empty(n + m, np.int64)
    rank[order] = np.arange(n + m)  # position of each value on the sorted grid
    # Each draw adds +1/n (from u) or -1/m (from v) at its grid position; the running sum
    # over the grid is then F_u - F_v of that replica.
    step = np.concatenate([np.full(n, 1.0 / n), np.full(m, -1.0 / m)])
    out = np.empty(n_boot)
    for start in range(0, n_boot, BOOTSTRAP_BATCH):
        b = min(BOOTSTRAP_BATCH, n_boot - start)
        draws = np.concatenate([rng.integers(0, n, size=(b, n)), rng.integers(n, n + m, size=(b, m))], axis=1)
        cells = rank[draws] + (np.arange(b) * (n + m))[:, None]
        mass = np.bincount(cells.ravel(), weights=step[draws].ravel(), minlength=b * (n + m)).reshape(b, n + m)
        cdf_diff = np.cumsum(mass, axis=1)[:, :-1]
        out[start : start + b] = np.abs(cdf_diff) @ gaps
    return out


def wasserstein(
    u, v, *, bootstrap: int = 0, rng: np.random.Generator | int | None = None, max_bootstrap_size: int = BOOTSTRAP_SIZE
) -> tuple[float, float]:
    """(W1(u, v), bootstrap standard deviation) of two 1-D samples; the error is NaN without bootstrap.

    Above ``max_bootstrap_size`` jets per sample the bootstrap runs on random subsamples
    (both shrunk by the same factor f) and its spread is scaled by sqrt(f): the variance of
    W1 falls like 1/n, and this keeps 100k-jet samples at the cost of 20k-jet ones.
    """
    from scipy.stats import wasserstein_distance

    u = np.asarray(u, np.float64).ravel()
    v = np.asarray(v, np.float64).ravel()
    if len(u) == 0 or len(v) == 0:
        raise TooFewJets(f"Wasserstein distance needs two non-empty samples; got sizes {len(u)} and {len(v)}")
    if not (np.isfinite(u).all() and np.isfinite(v).all()):
        raise ValueError("Wasserstein distance of samples with NaN or inf values")
    value = float(wasserstein_distance(u, v))
    if bootstrap <= 1:
        return value, float("nan")
    rng = np.random.default_rng(rng)
    (u, v), shrink = _bootstrap_subsamples((u, v), max_bootstrap_size, rng)
    return value, float(np.std(_bootstrap_wasserstein(u, v, bootstrap, rng), ddof=1) * np.sqrt(shrink))


def _bootstrap_subsamples(samples, max_size: int, rng: np.random.Generator) -> tuple[list[np.ndarray], float]:
    """Random subsamples of ``samples``, all shrunk by the factor f that brings the largest to
    ``max_size`` (none when it is already smaller), and f.

    Bootstrap spreads of statistics whose variance falls like 1/n, measured on the subsamples,
    times sqrt(f) are those of the full samples at a fraction of the cost.
    """
    shrink = min(1.0, max_size / max(len(s) for s in samples))
    if shrink < 1.0:
        samples = [rng.choice(s, size=max(2, int(len(s) * shrink)), replace=False) for s in samples]
    return list(samples), shrink


def mean_and_width(
    values, *, bootstrap: int = 0, rng: np.random.Generator | int | None = None,
    max_bootstrap_size: int = BOOTSTRAP_SIZE,
) -> dict:
    """The mean and the width (standard deviation, ``np.std``) of a 1-D sample, each with its
    bootstrap standard deviation: ``{"n", "mean", "mean_err", "width", "width_err"}``.

    The bootstrap follows :func:`wasserstein`: ``bootstrap`` replicas (errors are NaN without),
    drawn in batches, and above ``max_bootstrap_size`` values on a subsample with the spread
    scaled by sqrt(f).
    """
    values = np.asarray(values, np.float64).ravel()
    if len(values) == 0:
        raise TooFewJets("a mean and a width need a non-empty sample")
    if not np.isfinite(values).all():
        raise ValueError("mean and width of a sample with NaN or inf values")
    result = {"n": int(len(values)), "mean": float(values.mean()), "mean_err": float("nan"),
              "width": float(values.std()), "width_err": float("nan")}
    if bootstrap <= 1:
        return result
    rng = np.random.default_rng(rng)
    (values,), shrink = _bootstrap_subsamples((values,), max_bootstrap_size, rng)
    means, widths = np.empty(bootstrap), np.empty(bootstrap)
    for start in range(0, bootstrap, BOOTSTRAP_BATCH):
        b = min(BOOTSTRAP_BATCH, bootstrap - start)
        replicas = values[rng.integers(0, len(values), size=(b, len(values)))]  # (b, n)
        means[start : start + b] = replicas.mean(axis=1)
        widths[start : start + b] = replicas.std(axis=1)
    result["mean_err"] = float(np.std(means, ddof=1) * np.sqrt(shrink))
    result["width_err"] = float(np.std(widths, ddof=1) * np.sqrt(shrink))
    return result


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 and np.isfinite(den) else None


def distance_table(
    real: dict[str, np.ndarray],
    gen: dict[str, np.ndarray],
    *,
    bootstrap: int = 100,
    seed: int = 0,
    splits: int = FLOOR_SPLITS,
) -> dict[str, dict]:
    """Distances per observable (the keys common to ``real`` and ``gen``; 1-D arrays).

    Each entry: ``w`` ± ``w_err`` (all real vs all generated), ``w_norm`` (``w`` / real std),
    ``w_half`` (real half A vs k generated) and ``floor`` (real half A vs k jets of real half
    B), each the mean over ``splits`` random splits, ``ratio = w_half / floor``,
    ``floor_norm``, the real and generated means and the sizes. ``w_half_err`` and
    ``floor_err`` are the bootstrap errors of the first split's values: those of one split,
    larger than those of the mean over splits. Needs at least 2 real jets.
    """
    names = [k for k in real if k in gen and np.ndim(real[k]) == 1]
    n_real = len(real[names[0]]) if names else 0
    n_gen = len(gen[names[0]]) if names else 0
    if n_real < 2 or n_gen < 1:
        raise TooFewJets(f"distances need >= 2 real and >= 1 generated jets; got {n_real} real, {n_gen} generated")
    if splits < 1:
        raise ValueError(f"distance_table needs splits >= 1; got {splits}")
    rng = np.random.default_rng(seed)
    k = min(n_real - n_real // 2, n_gen)
    draws = []  # (half A, k jets of half B, k generated jets) per split
    for _ in range(splits):
        perm = rng.permutation(n_real)
        draws.append((perm[: n_real // 2], perm[n_real // 2 :][:k], rng.permutation(n_gen)[:k]))

    table = {}
    for name in names:
        r, g = np.asarray(real[name], np.float64), np.asarray(gen[name], np.float64)
        w, w_err = wasserstein(r, g, bootstrap=bootstrap, rng=rng)
        half_a, half_b, gen_k = draws[0]
        _, w_half_err = wasserstein(r[half_a], g[gen_k], bootstrap=bootstrap, rng=rng)
        _, floor_err = wasserstein(r[half_a], r[half_b], bootstrap=bootstrap, rng=rng)
        w_half = float(np.mean([wasserstein(r[a], g[c])[0] for a, _, c in draws]))
        floor = float(np.mean([wasserstein(r[a], r[b])[0] for a, b, _ in draws]))
        std = float(r.std())
        table[name] = {
            "w": w,
            "w_err": w_err,
            "w_norm": _ratio(w, std),
            "w_half": w_half,
            "w_half_err": w_half_err,
            "floor": floor,
            "floor_err": floor_err,
            "floor_norm": _ratio(floor, std),
            "ratio": _ratio(w_half, floor),
            "real_mean": float(r.mean()),
            "gen_mean": float(g.mean()),
            "real_std": std,
            "n_real": int(n_real),
            "n_gen": int(n_gen),
            "n_half": int(k),
            "splits": int(splits),
        }
    return table


# -- classifiers ---------------------------------------------------------------------------------
def _boosted_trees(seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier

    # Early stopping on an internal 10% split keeps fits short and avoids overfitting noise.
    return HistGradientBoostingClassifier(
        max_iter=200, learning_rate=0.1, early_stopping=True, validation_fraction=0.1, random_state=seed
    )


def _one_thread():
    """Run the boosted trees on one OpenMP thread.

    These fits are small (at most tens of thousands of jets x 13 observables, seconds on one
    core), while OpenMP workers that spin-wait on cores shared with other processes made the
    same fits 15-20x slower in our measurements.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="openmp")


def _auc_with_error(labels: np.ndarray, scores: np.ndarray, bootstrap: int, rng: np.random.Generator):
    """ROC AUC and its bootstrap standard deviation over the evaluated jets."""
    from sklearn.metrics import roc_auc_score

    auc = float(roc_auc_score(labels, scores))
    replicas = []
    for _ in range(bootstrap):
        pick = rng.integers(0, len(labels), len(labels))
        if labels[pick].min() != labels[pick].max():
            replicas.append(roc_auc_score(labels[pick], scores[pick]))
    err = float(np.std(replicas, ddof=1)) if len(replicas) > 1 else float("nan")
    return auc, err


def features_matrix(observables: dict[str, np.ndarray], names=None) -> np.ndarray:
    """Stack 1-D observables (N,) into a (N, F) float32 matrix, in the order of ``names``."""
    names = names or [k for k, v in observables.items() if np.ndim(v) == 1]
    return np.stack([np.asarray(observables[k], np.float32) for k in names], axis=1)


def classifier_two_sample_test(
    real_features: np.ndarray,
    gen_features: np.ndarray,
    *,
    folds: int = 3,
    max_per_side: int = 20_000,
    bootstrap: int = 100,
    seed: int = 0,
) -> dict:
    """Can a classifier tell real from generated jets? ROC AUC, 0.5 = indistinguishable.

    Both sides are subsampled to the same size (at most ``max_per_side``), a stratified
    ``folds``-fold split gives every jet an out-of-fold score, and the AUC of those scores
    is reported with its bootstrap error and the spread of the per-fold AUCs. An AUC below
    0.5 is a fluctuation around 0.5, not a better-than-perfect generator.
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(seed)
    n = min(len(real_features), len(gen_features), max_per_side)
    if n < MIN_JETS_PER_SIDE:
        raise TooFewJets(
            f"the classifier two-sample test needs >= {MIN_JETS_PER_SIDE} real and generated jets; "
            f"got {len(real_features)} real, {len(gen_features)} generated"
        )
    x = np.concatenate(
        [real_features[rng.permutation(len(real_features))[:n]], gen_features[rng.permutation(len(gen_features))[:n]]]
    )
    y = np.concatenate([np.zeros(n, np.int8), np.ones(n, np.int8)])
    scores = np.empty(2 * n)
    fold_aucs = []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        with _one_thread():
            model = _boosted_trees(seed).fit(x[train], y[train])
            scores[test] = model.predict_proba(x[test])[:, 1]
        fold_aucs.append(float(roc_auc_score(y[test], scores[test])))
    auc, auc_err = _auc_with_error(y, scores, bootstrap, rng)
    return {
        "auc": auc,
        "auc_err": auc_err,
        "fold_aucs": fold_aucs,
        "fold_std": float(np.std(fold_aucs, ddof=1)) if folds > 1 else float("nan"),
        "n_per_side": int(n),
        "folds": int(folds),
        "classifier": "HistGradientBoostingClassifier on the per-jet observables",
    }


def _both_classes(labels: np.ndarray) -> bool:
    """Whether int labels hold exactly the classes 0 and 1, with enough jets of each for an AUC."""
    return len(np.unique(labels)) == 2 and np.bincount(labels, minlength=2)[:2].min() >= MIN_JETS_PER_SIDE // 2


def quark_gluon_transfer(
    real_features: np.ndarray,
    real_labels: np.ndarray,
    gen_features: np.ndarray,
    gen_labels: np.ndarray,
    *,
    test_fraction: float = 0.5,
    max_train: int = 50_000,
    bootstrap: int = 100,
    seed: int = 0,
    others: dict | None = None,
    train: tuple | None = None,
) -> dict:
    """Train a quark/gluon classifier on real jets; AUC on held-out real jets and on generated jets.

    The classifier trains on ``train`` (features, labels) when given, e.g. the jets a model was
    trained on, and is then scored on every real jet; otherwise on a ``1 - test_fraction`` share
    of the real jets, scored on the rest.

    Labels are the file's ``y`` (in jetfast's files 1 = quark, 0 = gluon); the AUC does not
    depend on which value means quark as long as both files use the same convention.
    ``others`` (name -> (features, labels)) are scored by the same classifier, e.g. the rows of the
    fidelity ladder, so the stage that washes the classes out shows: ``auc_others[name]`` is
    ``{"auc", "auc_err"}``, or ``{"skipped": why}`` for a set without both classes.
    """
    from sklearn.model_selection import train_test_split

    real_labels = np.asarray(real_labels).astype(np.int8)
    gen_labels = np.asarray(gen_labels).astype(np.int8)
    for what, labels in (("real", real_labels), ("generated", gen_labels)):
        if not _both_classes(labels):
            raise TooFewJets(
                f"the quark/gluon test needs >= {MIN_JETS_PER_SIDE // 2} {what} jets of each class; "
                f"got class counts {dict(zip(*np.unique(labels, return_counts=True)))}"
            )
    rng = np.random.default_rng(seed)
    if train is not None:
        x_train, y_train = np.asarray(train[0]), np.asarray(train[1]).astype(np.int8)
        if not _both_classes(y_train):
            raise TooFewJets(f"the quark/gluon classifier needs >= {MIN_JETS_PER_SIDE // 2} training jets of each class")
        x_test, y_test = real_features, real_labels
    else:
        x_train, x_test, y_train, y_test = train_test_split(
            real_features, real_labels, test_size=test_fraction, stratify=real_labels, random_state=seed
        )
    if len(x_train) > max_train:
        keep = rng.permutation(len(x_train))[:max_train]
        x_train, y_train = x_train[keep], y_train[keep]
    with _one_thread():
        model = _boosted_trees(seed).fit(x_train, y_train)
        real_scores, gen_scores = model.predict_proba(x_test)[:, 1], model.predict_proba(gen_features)[:, 1]
    auc_real, auc_real_err = _auc_with_error(y_test, real_scores, bootstrap, rng)
    auc_gen, auc_gen_err = _auc_with_error(gen_labels, gen_scores, bootstrap, rng)
    scored = {}
    for name, (features, labels) in (others or {}).items():
        labels = np.asarray(labels).astype(np.int8)
        if not _both_classes(labels):
            scored[name] = {"skipped": f"needs >= {MIN_JETS_PER_SIDE // 2} jets of each class"}
            continue
        with _one_thread():
            scores = model.predict_proba(features)[:, 1]
        auc, auc_err = _auc_with_error(labels, scores, bootstrap, rng)
        scored[name] = {"auc": auc, "auc_err": auc_err}
    return {
        "auc_real": auc_real,
        "auc_real_err": auc_real_err,
        "auc_gen": auc_gen,
        "auc_gen_err": auc_gen_err,
        "n_train": int(len(x_train)),
        "trained_on": "given" if train is not None else "real half",
        "n_real_test": int(len(x_test)),
        "n_gen": int(len(gen_features)),
        "auc_others": scored,
        "classifier": "HistGradientBoostingClassifier on the per-jet observables, trained on real jets",
    }


def cnn_two_sample_test(
    real_images: np.ndarray,
    gen_images: np.ndarray,
    *,
    epochs: int = 6,
    test_fraction: float = 1 / 3,
    max_per_side: int = 10_000,
    bootstrap: int = 100,
    seed: int = 0,
) -> dict:
    """Can a small CNN tell real from generated jet *images*? ROC AUC on held-out jets.

    Inputs are (N, 25, 25, 3) coarse images (each pixel the sum of a 5x5 block, i.e. one
    HCAL tower; see ``read_jets(keep_coarse=...)``). The observables test sees only what the
    observables encode; this one also sees spatial structure (e.g. tower patterns, noise
    in empty regions). log1p compresses the huge dynamic range of Tracks.
    """
    import torch
    from torch import nn

    n = min(len(real_images), len(gen_images), max_per_side)
    if n < MIN_JETS_PER_SIDE:
        raise TooFewJets(
            f"the CNN two-sample test needs >= {MIN_JETS_PER_SIDE} real and generated jets; "
            f"got {len(real_images)} real, {len(gen_images)} generated"
        )
    rng = np.random.default_rng(seed)
    images = np.concatenate(
        [real_images[rng.permutation(len(real_images))[:n]], gen_images[rng.permutation(len(gen_images))[:n]]]
    )
    x = torch.from_numpy(np.log1p(np.clip(images, 0, None)).transpose(0, 3, 1, 2).astype(np.float32))  # (2n, 3, 25, 25)
    y = torch.cat([torch.zeros(n), torch.ones(n)])
    order = rng.permutation(2 * n)
    n_test = max(2, int(round(2 * n * test_fraction)))
    test, train = torch.from_numpy(order[:n_test]), torch.from_numpy(order[n_test:])

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, 12, 12)
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 6, 6)
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 32)
        nn.Linear(32, 1),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for batch in train[torch.randperm(len(train), generator=generator)].split(256):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x[batch]).squeeze(1), y[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        scores = torch.cat([model(x[b]).squeeze(1) for b in test.split(1024)]).numpy()
    auc, auc_err = _auc_with_error(y[test].numpy().astype(np.int8), scores, bootstrap, rng)
    return {
        "auc": auc,
        "auc_err": auc_err,
        "n_per_side": int(n),
        "n_test": int(n_test),
        "epochs": int(epochs),
        "classifier": "3-layer CNN on log1p of 25x25 tower-summed images, held-out third",
    }


# -- Fréchet and kernel physics distances ---------------------------------------------------------
def _normalized(real: np.ndarray, gen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both samples divided feature by feature by the largest |value| of the real one."""
    real, gen = np.asarray(real, np.float64), np.asarray(gen, np.float64)
    scale = np.abs(real).max(axis=0)
    scale[scale == 0] = 1.0
    return real / scale, gen / scale


def frechet_distance(mean_a, cov_a, mean_b, cov_b) -> float:
    """||mean_a - mean_b||^2 + Tr(cov_a + cov_b - 2 (cov_a cov_b)^(1/2)): the Fréchet (2-Wasserstein)
    distance squared between two Gaussians."""
    import warnings

    from scipy import linalg

    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    with warnings.catch_warnings():  # a singular product is handled below, as JetNet does
        warnings.simplefilter("ignore")
        root = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(root).all():
            offset = np.eye(len(cov_a)) * 1e-6
            root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    diff = np.atleast_1d(mean_a) - np.atleast_1d(mean_b)
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(np.real(root)))


def fpd(real_features, gen_features, *, min_samples: int = 20_000, max_samples: int = 50_000,
        num_batches: int = 20, num_points: int = 10, seed: int = 42) -> dict:
    """Fréchet physics distance: value and error, with JetNet's protocol.

    At ``num_points`` sample sizes N evenly spaced in 1/N from ``min_samples`` to
    ``max_samples`` (each cut to the smaller sample), ``num_batches`` draws with replacement of
    N jets per side give a mean Fréchet distance; a straight line in 1/N with non-negative
    intercept and slope is fitted, and its intercept (the distance at infinite N) is the FPD.
    """
    from scipy.optimize import curve_fit

    real, gen = _normalized(real_features, gen_features)
    available = min(len(real), len(gen))
    if available < MIN_JETS_PER_SIDE:
        raise TooFewJets(f"FPD needs >= {MIN_JETS_PER_SIDE} jets per side; got {len(real)} and {len(gen)}")
    top = min(max_samples, available)
    low = min(min_samples, max(2, top * 2 // 5))
    sizes = np.unique((1.0 / np.linspace(1.0 / low, 1.0 / top, num_points)).astype(np.int64))
    rng = np.random.default_rng(seed)
    means = []
    for size in sizes:
        values = []
        for _ in range(num_batches):
            a = real[rng.choice(len(real), size=size)]
            b = gen[rng.choice(len(gen), size=size)]
            values.append(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))
        means.append(np.mean(values))
    if len(sizes) < 2:
        return {"value": float(means[0]), "err": float("nan"), "sizes": sizes.tolist()}
    params, cov = curve_fit(lambda x, intercept, slope: intercept + slope * x, 1.0 / sizes, means,
                            bounds=([0, 0], [np.inf, np.inf]))
    return {"value": float(params[0]), "err": float(np.sqrt(cov[0, 0])), "sizes": [int(sizes[0]), int(sizes[-1])]}


def mmd_polynomial(x: np.ndarray, y: np.ndarray, degree: int = 4) -> float:
    """Unbiased estimate of MMD^2 between samples x (m, d) and y (n, d) with the kernel
    k(a, b) = (a.b / d + 1)^degree (the diagonal of the within-sample sums left out)."""
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** degree
    kyy = (y @ y.T / d + 1.0) ** degree
    kxy = (x @ y.T / d + 1.0) ** degree
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def kpd(real_features, gen_features, *, num_batches: int = 10, batch_size: int = 5_000, seed: int = 42) -> dict:
    """Kernel physics distance with JetNet's protocol: the median of the unbiased polynomial-kernel
    MMD^2 over ``num_batches`` draws (with replacement) of ``batch_size`` jets per side (cut to the
    smaller sample), and half the 16-84% spread as its error."""
    from scipy.stats import iqr

    real, gen = _normalized(real_features, gen_features)
    size = min(batch_size, len(real), len(gen))
    if size < MIN_JETS_PER_SIDE:
        raise TooFewJets(f"KPD needs >= {MIN_JETS_PER_SIDE} jets per side; got {len(real)} and {len(gen)}")
    values = []
    for i in range(num_batches):
        rng = np.random.default_rng(seed + i * 1000)
        values.append(mmd_polynomial(real[rng.choice(len(real), size=size)], gen[rng.choice(len(gen), size=size)]))
    return {"value": float(np.median(values)), "err": float(iqr(values, rng=(16.275, 83.725)) / 2), "batch_size": int(size)}

