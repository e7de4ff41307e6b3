"""Batched 1-D K-Means (jetfast.bins) against independent NumPy references and faiss.kmeans1d."""

import numpy as np
import pytest
import torch

from jetfast import _ext, bins, dequantize, quantize

pytestmark = pytest.mark.skipif(not _ext.HAS_NATIVE, reason="jetfast._C is not built")


# -- independent references ----------------------------------------------------------------------
def reference_inertia(x: np.ndarray, centers: np.ndarray) -> float:
    """Brute force: squared distance of every value to every center, float64."""
    x = np.asarray(x, np.float64)[:, None]
    return float(np.min((x - np.asarray(centers, np.float64)[None, :]) ** 2, axis=1).sum())


def reference_exact(x: np.ndarray, k: int) -> float:
    """Optimal K-Means error of a 1-D sample by dynamic programming over the full
    (distinct x distinct) cost matrix: O(K U^2), for small U only."""
    values, counts = np.unique(np.asarray(x, np.float64), return_counts=True)
    values = values - values.mean()
    u = len(values)
    if u <= k:
        return 0.0
    s0 = np.concatenate([[0.0], np.cumsum(counts)])
    s1 = np.concatenate([[0.0], np.cumsum(counts * values)])
    s2 = np.concatenate([[0.0], np.cumsum(counts * values**2)])
    i, j = np.meshgrid(np.arange(u + 1), np.arange(u + 1), indexing="ij")
    with np.errstate(divide="ignore", invalid="ignore"):
        w = s0[j] - s0[i]
        cost = (s2[j] - s2[i]) - (s1[j] - s1[i]) ** 2 / w
    cost = np.where(j > i, np.maximum(cost, 0.0), np.inf)  # cost[i, j]: run [i, j)
    best = cost[0].copy()  # one cluster over [0, j)
    for _ in range(k - 1):
        best = np.min(best[:, None] + cost, axis=0)
    return float(best[u])


def reference_lloyd_step(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """One brute-force Lloyd step: nearest center (ties low), then cell means (empty cells keep theirs)."""
    x = np.asarray(x, np.float64)
    c = np.asarray(centers, np.float64)
    nearest = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
    sums = np.bincount(nearest, weights=x, minlength=len(c))
    counts = np.bincount(nearest, minlength=len(c))
    return np.where(counts > 0, sums / np.maximum(counts, 1), c)


def faiss_exact(x: np.ndarray, k: int) -> float:
    import faiss

    x = np.ascontiguousarray(x, np.float32)
    centers = np.empty(k, np.float32)
    faiss.kmeans1d(faiss.swig_ptr(x), len(x), k, faiss.swig_ptr(centers))
    return reference_inertia(x, centers)


def realistic_latents(rng, n: int, per_kind: int) -> tuple[np.ndarray, list[str]]:
    """Columns shaped like VAE latents and their hard cases, ``per_kind`` of each kind."""
    kinds = {
        "gaussian": lambda: rng.normal(rng.uniform(-1, 1), rng.uniform(0.2, 2.0), n),
        "bimodal": lambda: np.where(rng.random(n) < rng.uniform(0.2, 0.5), rng.normal(-2.5, 0.4, n), rng.normal(1.0, 1.0, n)),
        "student_t2": lambda: rng.standard_t(2.0, n),
        "cauchy": lambda: rng.standard_cauchy(n),
        "rounded": lambda: np.round(rng.normal(0, 1, n), 2),  # ~600 distinct values, many repeats
    }
    columns, names = [], []
    for name, draw in kinds.items():
        for _ in range(per_kind):
            columns.append(draw())
            names.append(name)
    return np.stack(columns, axis=1).astype(np.float32), names


# -- quality -------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,per_kind", [(256, 1), (64, 4)])
def test_lloyd1d_within_one_percent_of_exact_on_every_dimension(k, per_kind, rng):
    latents, names = realistic_latents(rng, 5003, per_kind)
    centers = bins.fit_bins(latents, num_bins=k)
    assert centers.shape == (latents.shape[1], k) and centers.dtype == np.float32
    assert np.all(np.diff(centers, axis=1) >= 0)
    got = bins.inertia(latents, centers)
    reference = bins.inertia(latents, bins.fit_bins(latents, num_bins=k, method="exact"))
    ratios = got / reference
    worst = int(np.argmax(ratios))
    assert ratios.max() <= 1.01, f"{names[worst]} dimension {worst}: inertia {ratios[worst]:.4f} x exact"
    # faiss.kmeans1d accumulates in float32 and can miss its optimum by ~1e-4 (seen on
    # bimodal data); anything much lower would mean the two inertias measure different things.
    assert ratios.min() >= 1 - 1e-3


def test_exact_method_is_the_optimum(rng):
    # Small enough for the O(K U^2) reference; with and without repeated values (faiss's
    # own kmeans1d fails on some repeated-value inputs, where the native programme takes over).
    continuous = rng.standard_t(3.0, 301)
    repeated = np.round(rng.normal(0, 1, 400), 1)
    latents = np.stack([continuous, repeated[:301]], axis=1).astype(np.float32)
    k = 9
    centers = bins.fit_bins(latents, num_bins=k, method="exact")
    for dim in range(2):
        optimum = reference_exact(latents[:, dim], k)
        assert reference_inertia(latents[:, dim], centers[dim]) == pytest.approx(optimum, rel=1e-4)


@pytest.mark.parametrize("n,k", [(257, 7), (1000, 31)])
def test_lloyd1d_is_a_lloyd_fixed_point_near_the_optimum(n, k, rng):
    latents = np.stack([rng.normal(size=n), rng.exponential(size=n), rng.standard_cauchy(size=n)], axis=1).astype(np.float32)
    centers = bins.fit_bins(latents, num_bins=k)
    for dim in range(latents.shape[1]):
        column = latents[:, dim]
        # Converged Lloyd: one more brute-force step moves no center.
        np.testing.assert_allclose(reference_lloyd_step(column, centers[dim]), centers[dim], rtol=1e-5, atol=1e-6)
        assert reference_inertia(column, centers[dim]) <= reference_exact(column, k) * 1.01


def test_two_bins_one_dimension_is_exact(rng):
    column = rng.normal(size=1001).astype(np.float32)
    centers = bins.fit_bins(column[:, None], num_bins=2)
    assert centers.shape == (1, 2)
    # Exact 2-means in 1-D: best of all split points of the sorted values.
    s = np.sort(column.astype(np.float64))
    errors = [((s[:i] - s[:i].mean()) ** 2).sum() + ((s[i:] - s[i:].mean()) ** 2).sum() for i in range(1, len(s))]
    assert reference_inertia(column, centers[0]) == pytest.approx(min(errors), rel=1e-6)


def test_faiss_method_is_sane_and_uses_every_point(rng):
    n, k = 20011, 16  # FAISS's default would subsample to 256 * 16 = 4096 points
    latents, _ = realistic_latents(rng, n, 1)
    centers = bins.fit_bins(latents, num_bins=k, method="faiss", seed=3, num_threads=1)
    assert centers.shape == (latents.shape[1], k) and np.all(np.diff(centers, axis=1) >= 0)
    ratios = bins.inertia(latents, centers) / bins.inertia(latents, bins.fit_bins(latents, num_bins=k, method="exact"))
    assert ratios.max() <= 1.03
    # FAISS's Lloyd steps run over all N points: from the same start (lloyd1d without
    # iterations), brute-force Lloyd steps give the same centers; a subsample's cell
    # means would differ by ~2% of a cell.
    steps = 5
    lloyd = bins.fit_bins(latents, num_bins=k, max_iter=0).astype(np.float64)
    for _ in range(steps):
        lloyd = np.stack([reference_lloyd_step(latents[:, d], lloyd[d]) for d in range(latents.shape[1])])
    theirs = bins.fit_bins(latents, num_bins=k, method="faiss", max_iter=steps, num_threads=1)
    width = np.diff(lloyd, axis=1).min(axis=1, keepdims=True)
    assert np.all(np.abs(theirs - lloyd) <= 1e-3 * width + 1e-6)
    np.testing.assert_array_equal(centers, bins.fit_bins(latents, num_bins=k, method="faiss", seed=3, num_threads=1))


# -- conventions and edge cases ------------------------------------------------------------------
@pytest.mark.parametrize("method", bins.METHODS)
def test_constant_and_few_distinct_dimensions(method, rng):
    n, k = 301, 8
    latents = np.stack(
        [np.full(n, -1.25), rng.choice([0.5, -3.0, 2.0], n), rng.normal(size=n)], axis=1
    ).astype(np.float32)
    centers = bins.fit_bins(latents, num_bins=k, method=method)
    np.testing.assert_array_equal(centers[0], np.full(k, -1.25, np.float32))
    np.testing.assert_array_equal(centers[1], np.array([-3.0, 0.5] + [2.0] * (k - 2), np.float32))
    assert np.all(np.diff(centers, axis=1) >= 0)
    # The quantizer accepts repeated centers, and those dimensions round-trip exactly.
    z_hat = dequantize(quantize(latents, centers), centers)
    np.testing.assert_array_equal(z_hat[:, :2], latents[:, :2])


@pytest.mark.parametrize("method", bins.METHODS)
def test_non_finite_latents_are_a_clear_error(method, rng):
    latents = rng.normal(size=(300, 5)).astype(np.float32)
    latents[123, 3] = np.nan
    latents[200, 1] = np.inf
    with pytest.raises(bins.BinFitError, match="row 123, dimension 3"):
        bins.fit_bins(latents, num_bins=4, method=method)
    latents[123, 3] = 0.0
    with pytest.raises(bins.BinFitError, match="row 200, dimension 1"):
        bins.fit_bins(latents, num_bins=4, method=method)


def test_bad_arguments_are_clear_errors(rng):
    latents = rng.normal(size=(100, 3)).astype(np.float32)
    with pytest.raises(bins.BinFitError, match="100 latent vectors cannot place 256 bins"):
        bins.fit_bins(latents)
    with pytest.raises(bins.BinFitError, match="0 latent vectors"):
        bins.fit_bins(latents[:0], num_bins=4)
    with pytest.raises(ValueError, match="num_bins"):
        bins.fit_bins(latents, num_bins=1)
    with pytest.raises(ValueError, match="num_bins"):
        bins.fit_bins(latents, num_bins=70000)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        bins.fit_bins(latents[:, 0], num_bins=4)
    with pytest.raises(TypeError, match="floating point"):
        bins.fit_bins(latents.astype(np.int32), num_bins=4)
    with pytest.raises(ValueError, match="method"):
        bins.fit_bins(latents, num_bins=4, method="kmeans++")
    with pytest.raises(ValueError, match="num_threads"):
        bins.fit_bins(latents, num_bins=4, num_threads=0)


def test_native_entry_point_checks_sizes():
    from jetfast import _C

    latents = np.zeros((50, 3), np.float32)
    ok = dict(max_iter=5, tol=0.0, init="coarse_exact", groups_per_bin=8, num_threads=1)
    iterations, distinct = np.zeros(3, np.int32), np.zeros(3, np.int64)
    with pytest.raises(ValueError, match="centers must be"):
        _C.kmeans1d_cpu(latents, np.zeros((2, 4), np.float32), iterations, distinct, **ok)
    with pytest.raises(ValueError, match="iterations must be"):
        _C.kmeans1d_cpu(latents, np.zeros((3, 4), np.float32), np.zeros(2, np.int32), distinct, **ok)
    with pytest.raises(ValueError, match="init must be"):
        _C.kmeans1d_cpu(latents, np.zeros((3, 4), np.float32), iterations, distinct, **{**ok, "init": "random"})
    with pytest.raises(TypeError):  # float64 is refused, not silently copied
        _C.kmeans1d_cpu(latents.astype(np.float64), np.zeros((3, 4), np.float32), iterations, distinct, **ok)


def test_deterministic_and_independent_of_threads(rng):
    latents, _ = realistic_latents(rng, 3001, 1)
    latents = np.concatenate([latents, rng.normal(size=(3001, 2)).astype(np.float32)], axis=1)  # D = 7
    one = bins.fit_bins(latents, num_bins=37, num_threads=1)
    np.testing.assert_array_equal(one, bins.fit_bins(latents, num_bins=37, num_threads=2))
    np.testing.assert_array_equal(one, bins.fit_bins(latents, num_bins=37, num_threads=3, seed=99))
    # Same answer for a torch tensor and for a float64 array.
    np.testing.assert_array_equal(one, bins.fit_bins(torch.from_numpy(latents), num_bins=37))
    np.testing.assert_array_equal(one, bins.fit_bins(latents.astype(np.float64), num_bins=37))


def test_inertia_and_quantization_error_match_brute_force(rng):
    latents = rng.normal(size=(999, 4)).astype(np.float32) * np.array([1, 2, 0.5, 3], np.float32)
    centers = np.sort(rng.normal(size=(4, 11)).astype(np.float32), axis=1)
    expected = np.array([reference_inertia(latents[:, d], centers[d]) for d in range(4)])
    np.testing.assert_allclose(bins.inertia(latents, centers, chunk_rows=100), expected, rtol=1e-9)
    error = bins.quantization_error(latents, centers)
    np.testing.assert_allclose(error["rms"], np.sqrt(expected / 999), rtol=1e-9)
    np.testing.assert_allclose(error["relative_rms"], error["rms"] / latents.astype(np.float64).std(axis=0), rtol=1e-9)


def test_bins_file_round_trip(tmp_path, rng):
    centers = np.sort(rng.normal(size=(5, 6)).astype(np.float32), axis=1)
    path = bins.save_bins(tmp_path / "bins.npz", centers, method="lloyd1d", num_bins=6, inertia=np.arange(5.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bins.npz"]  # no leftover *.tmp
    loaded, metadata = bins.load_bins(tmp_path)
    np.testing.assert_array_equal(loaded, centers)
    assert metadata["method"] == "lloyd1d" and metadata["num_bins"] == 6
    np.testing.assert_array_equal(metadata["inertia"], np.arange(5.0))
    with pytest.raises(FileNotFoundError, match="fit-bins"):
        bins.load_bins(tmp_path / "missing")


def test_native_writes_every_output(rng):
    """Poisoned outputs: any center, iteration count or distinct count left unwritten fails."""
    from jetfast import _C

    n, d, k = 301, 127, 5
    latents = rng.normal(size=(n, d)).astype(np.float32)
    latents[:, 3] = 7.0  # constant
    latents[:, 10] = rng.choice([1.0, 2.0], n)  # fewer distinct values than bins
    centers = np.full((d, k), np.nan, np.float32)
    iterations = np.full(d, -1, np.int32)
    distinct = np.full(d, -1, np.int64)
    assert _C.kmeans1d_cpu(latents, centers, iterations, distinct, 50, 1e-9, "coarse_exact", 8, 2) == -1
    assert np.isfinite(centers).all() and np.all(np.diff(centers, axis=1) >= 0)
    assert (iterations >= 0).all() and iterations[3] == 0
    np.testing.assert_array_equal(distinct, [len(np.unique(latents[:, j])) for j in range(d)])
