"""Latent bins: N = 100,000 latent vectors, D = 128 dimensions, K = 256 bins.

The latents mix the shapes VAE latents take: Gaussian of various widths, bimodal,
Student-t (3 degrees of freedom) and a Cauchy-like t (1.2 degrees of freedom), and
rounded values (many repeats).

In the same run:
- ``lloyd1d`` (jetfast's native solver) on all 128 dimensions, timed;
- the seed approach, scikit-learn ``KMeans(n_clusters=256, n_init=1)`` per dimension,
  and ``faiss``: both timed on a few dimensions (one of each shape) and scaled to 128;
- ``exact`` (faiss.kmeans1d, the optimum) on the same few dimensions: the inertia of
  every method on them is reported relative to it;
- plain Lloyd from equal-count quantiles (lloyd1d without its coarse exact start), to
  show what the start buys.

Run: ``pytest benchmarks/bench_bins.py --benchmark-only`` (a few minutes: the
baselines take seconds per dimension).
"""

import time

import numpy as np
import pytest
import torch

from jetfast import _ext, bins

pytestmark = pytest.mark.skipif(not _ext.HAS_NATIVE, reason="jetfast._C is not built")

N, D, K = 100_000, 128, 256
KINDS = ("gaussian", "bimodal", "student_t3", "cauchy_like", "rounded")


def latent_like(seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    draws = {
        "gaussian": lambda: rng.normal(rng.uniform(-0.5, 0.5), rng.uniform(0.3, 1.5), N),
        "bimodal": lambda: np.where(rng.random(N) < rng.uniform(0.2, 0.5), rng.normal(-2.0, 0.4, N), rng.normal(1.0, 0.8, N)),
        "student_t3": lambda: rng.standard_t(3.0, N),
        "cauchy_like": lambda: rng.standard_t(1.2, N),
        "rounded": lambda: np.round(rng.normal(0, 1, N), 2),
    }
    kinds = [KINDS[d % len(KINDS)] for d in range(D)]
    return np.stack([draws[kind]() for kind in kinds], axis=1).astype(np.float32), kinds


def test_fit_bins(benchmark, record):
    latents, kinds = latent_like()
    threads = torch.get_num_threads()
    # One dimension of each shape for the slow baselines and the exact reference.
    probe = [kinds.index(kind) for kind in KINDS]
    sub = np.ascontiguousarray(latents[:, probe])

    bins.fit_bins(latents[:2000], num_bins=K)  # warm-up
    centers = benchmark.pedantic(bins.fit_bins, args=(latents,), kwargs=dict(num_bins=K, num_threads=threads),
                                 rounds=3, warmup_rounds=0)
    lloyd_seconds = benchmark.stats.stats.min

    exact = bins.fit_bins(sub, num_bins=K, method="exact")
    exact_inertia = bins.inertia(sub, exact)

    def ratio(centers_sub):
        return bins.inertia(sub, centers_sub) / exact_inertia

    lloyd_ratio = ratio(centers[probe])

    # Plain Lloyd from quantiles, all dimensions (same native code, no coarse exact start).
    plain, _, _ = bins._native_kmeans1d(latents, K, 100, bins.DEFAULT_TOL, "quantile", 0, threads)
    plain_ratio = ratio(plain[probe])

    start = time.perf_counter()
    faiss_centers = bins.fit_bins(sub, num_bins=K, method="faiss", num_threads=threads)
    faiss_per_dim = (time.perf_counter() - start) / len(probe)
    faiss_ratio = ratio(faiss_centers)

    from sklearn.cluster import KMeans

    sklearn_centers = np.empty((len(probe), K), np.float32)
    start = time.perf_counter()
    for i in range(len(probe)):
        fit = KMeans(n_clusters=K, n_init=1, random_state=0).fit(sub[:, i : i + 1])
        sklearn_centers[i] = np.sort(fit.cluster_centers_.ravel())
    sklearn_per_dim = (time.perf_counter() - start) / len(probe)
    sklearn_ratio = ratio(sklearn_centers)

    record(
        lloyd1d_s=lloyd_seconds,
        lloyd1d_ms_per_dim=1e3 * lloyd_seconds / D,
        faiss_s_scaled_to_128=faiss_per_dim * D,
        sklearn_s_scaled_to_128=sklearn_per_dim * D,
        speedup_vs_sklearn=sklearn_per_dim * D / lloyd_seconds,
        speedup_vs_faiss=faiss_per_dim * D / lloyd_seconds,
        lloyd1d_inertia_vs_exact_max=float(lloyd_ratio.max()),
        faiss_inertia_vs_exact_max=float(faiss_ratio.max()),
        sklearn_inertia_vs_exact_max=float(sklearn_ratio.max()),
        plain_lloyd_inertia_vs_exact_max=float(plain_ratio.max()),
        per_kind_lloyd1d={k: round(float(r), 5) for k, r in zip(KINDS, lloyd_ratio)},
        per_kind_sklearn={k: round(float(r), 4) for k, r in zip(KINDS, sklearn_ratio)},
        threads=threads,
    )
    assert lloyd_ratio.max() <= 1.01
