"""Latent discretisation: K bin centers per latent dimension (1-D K-Means).

Every latent dimension is clustered on its own into ``num_bins`` centers; the
quantizer (:func:`jetfast.quantize`) then maps a latent value to the index of its
nearest center. Three methods:

``"lloyd1d"`` (default, native C++, all dimensions in parallel)
    Sort once, float64 prefix sums, then an exact dynamic programme on a coarsened
    problem (the sorted values cut into <= 8 K runs of bounded squared error) as the
    start, polished by Lloyd iterations that binary-search the midpoints between
    centers (O(K log N) per iteration) and by sweeps that move each edge between two
    neighbouring bins to the exact best place for their union. Within 0.1% of the
    exact optimum on Gaussian, bimodal, heavy-tailed and rounded data (plain Lloyd
    from quantiles stalls 3-5x above it, and far worse on heavy tails); deterministic.
``"faiss"``
    :class:`faiss.Kmeans` on every dimension (on GPU when FAISS sees one), using all
    points and started from the same coarse exact solution: from FAISS's own random
    start, 1-D K-Means stalls 4-9x above the optimum (orders of magnitude on heavy tails).
``"exact"``
    The optimum, by :func:`faiss.kmeans1d` (dynamic programming with SMAWK; about
    5-15 s per 100k-value dimension). Where repeated values make faiss's assignment
    fail, the native dynamic programme runs over the distinct values instead (also
    exact). The quality reference.

Conventions shared by all methods: rows of the returned ``centers`` are sorted
ascending; a dimension with U < K distinct values (a constant dimension: U = 1) gets
its U values as the first U centers and the largest value repeated in the rest
(zero error; ties go to the first equal center when quantizing); non-finite latents,
fewer latent vectors than bins, and K < 2 are errors.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from jetfast.errors import BinFitError, InvalidArgument, RunDirError
from jetfast.run import RunDir

METHODS = ("lloyd1d", "faiss", "exact")
MAX_BINS = 65536  # what the quantizer's codes can index

# Runs per bin of lloyd1d's coarse start: 8 puts the start within ~0.3% of the optimum
# and the polished result within ~0.05%, at a cost independent of N (4 doubles the gap
# and halves the cost; see benchmarks/bench_bins.py).
GROUPS_PER_BIN = 8
DEFAULT_MAX_ITER = {"lloyd1d": 100, "faiss": 20}
DEFAULT_TOL = 1e-9


# -- fitting -------------------------------------------------------------------------------------
def fit_bins(
    latents,
    num_bins: int = 256,
    method: str = "lloyd1d",
    seed: int = 0,
    num_threads: int | None = None,
    max_iter: int | None = None,
    tol: float | None = None,
) -> np.ndarray:
    """K-Means bin centers for every latent dimension.

    Args:
        latents: (N, D) latent vectors (NumPy or torch; floating point, converted to
            float32 on the host). N >= num_bins.
        num_bins: K, 2 <= K <= 65536.
        method: ``"lloyd1d"``, ``"faiss"`` or ``"exact"`` (see the module docstring).
        seed: used by ``"faiss"`` only (its empty-cluster splitting is random);
            ``"lloyd1d"`` and ``"exact"`` are deterministic.
        num_threads: CPU threads; default ``torch.get_num_threads()``.
        max_iter: Lloyd iterations after the start (lloyd1d default 100, also the cap
            on its edge sweeps; faiss 20). 0 returns lloyd1d's coarse exact start.
        tol: lloyd1d stops once an iteration lowers the squared error by less than
            ``tol`` times it (default 1e-9), or when no value changes bin.

    Returns:
        centers (D, K) float32, every row sorted ascending.
    """
    centers, _ = fit_bins_with_info(latents, num_bins, method, seed, num_threads, max_iter, tol)
    return centers


def fit_bins_with_info(
    latents,
    num_bins: int = 256,
    method: str = "lloyd1d",
    seed: int = 0,
    num_threads: int | None = None,
    max_iter: int | None = None,
    tol: float | None = None,
) -> tuple[np.ndarray, dict]:
    """:func:`fit_bins` plus a dict of diagnostics (method, sizes, time, iterations, distinct values)."""
    if method not in METHODS:
        raise InvalidArgument(f"method must be one of {METHODS}; got {method!r}")
    latents = as_latents(latents, "fit_bins")
    num_bins = check_num_bins(num_bins)
    n, d = latents.shape
    if n < num_bins:
        raise BinFitError(
            f"fit_bins: {n} latent vectors cannot place {num_bins} bins (need N >= K); "
            "encode more jets or ask for fewer bins (--num-bins)"
        )
    threads = _threads(num_threads)
    if max_iter is not None and int(max_iter) < 0:
        raise InvalidArgument(f"max_iter must be >= 0; got {max_iter}")
    if tol is not None and not float(tol) >= 0:
        raise InvalidArgument(f"tol must be >= 0; got {tol}")
    max_iter = DEFAULT_MAX_ITER.get(method, 0) if max_iter is None else int(max_iter)
    tol = DEFAULT_TOL if tol is None else float(tol)

    start = time.perf_counter()
    info = {"method": method, "num_bins": num_bins, "num_vectors": n, "latent_dim": d, "seed": int(seed)}
    if method == "lloyd1d":
        centers, iterations, distinct = _native_kmeans1d(latents, num_bins, max_iter, tol, "coarse_exact", GROUPS_PER_BIN, threads)
        info.update(iterations=iterations.tolist(), distinct_values=distinct.tolist())
    else:
        _require_finite(latents)
        if method == "faiss":
            centers = _fit_faiss(latents, num_bins, seed, max_iter, threads)
        else:
            centers = _fit_exact(latents, num_bins, threads)
    info["fit_seconds"] = time.perf_counter() - start
    return centers, info


def as_latents(latents, what: str = "latents") -> np.ndarray:
    """(N, D) floating point NumPy/torch -> C-contiguous float32 NumPy on the host."""
    if hasattr(latents, "detach") and hasattr(latents, "cpu"):  # a torch tensor
        latents = latents.detach().cpu().numpy()
    if not isinstance(latents, np.ndarray):
        raise TypeError(f"{what}: latents must be a NumPy array or torch tensor; got {type(latents).__name__}")
    if latents.ndim != 2:
        raise ValueError(f"{what}: latents must be (N, D); got shape {latents.shape}")
    if not np.issubdtype(latents.dtype, np.floating):
        raise TypeError(f"{what}: latents must be floating point; got {latents.dtype}")
    if latents.shape[1] < 1:
        raise ValueError(f"{what}: latents have no dimension (shape {latents.shape})")
    return np.ascontiguousarray(latents, dtype=np.float32)


def check_num_bins(num_bins) -> int:
    if isinstance(num_bins, bool) or int(num_bins) != num_bins:
        raise TypeError(f"num_bins must be an integer; got {num_bins!r}")
    num_bins = int(num_bins)
    if not 2 <= num_bins <= MAX_BINS:
        raise InvalidArgument(f"num_bins must be in [2, {MAX_BINS}]; got {num_bins}")
    return num_bins


def _threads(num_threads) -> int:
    if num_threads is None:
        import torch

        return torch.get_num_threads()
    if int(num_threads) < 1:
        raise InvalidArgument(f"num_threads must be >= 1; got {num_threads}")
    return int(num_threads)


def _require_finite(latents: np.ndarray) -> None:
    finite = np.isfinite(latents)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        _raise_non_finite(latents, int(row), int(col))


def _raise_non_finite(latents: np.ndarray, row: int, col: int):
    raise BinFitError(
        f"latents hold a non-finite value ({latents[row, col]}) at row {row}, dimension {col}; "
        "the encoder diverged or the input has NaN/inf pixels"
    )


def _native_kmeans1d(latents, num_bins, max_iter, tol, init, groups_per_bin, threads):
    from jetfast._ext import require_native

    native = require_native()
    d = latents.shape[1]
    centers = np.empty((d, num_bins), np.float32)
    iterations = np.empty(d, np.int32)
    distinct = np.empty(d, np.int64)
    bad = native.kmeans1d_cpu(latents, centers, iterations, distinct, max_iter, tol, init, groups_per_bin, threads)
    if bad >= 0:
        _raise_non_finite(latents, bad // d, bad % d)
    return centers, iterations, distinct


def _few_distinct(column: np.ndarray, num_bins: int) -> np.ndarray | None:
    """The documented centers of a column with <= K distinct values, else None."""
    distinct = np.unique(column)
    if len(distinct) > num_bins:
        return None
    return np.concatenate([distinct, np.full(num_bins - len(distinct), distinct[-1], np.float32)])


def _fit_faiss(latents: np.ndarray, num_bins: int, seed: int, max_iter: int, threads: int) -> np.ndarray:
    import faiss

    n, d = latents.shape
    # The coarse exact start (no Lloyd): FAISS then polishes it with all N points.
    start, _, _ = _native_kmeans1d(latents, num_bins, 0, 0.0, "coarse_exact", GROUPS_PER_BIN, threads)
    use_gpu = faiss.get_num_gpus() > 0
    centers = np.empty((d, num_bins), np.float32)

    def fit_dimension(dim: int) -> None:
        column = np.ascontiguousarray(latents[:, dim : dim + 1])
        few = _few_distinct(column[:, 0], num_bins)
        if few is not None:
            centers[dim] = few
            return
        kmeans = faiss.Kmeans(
            1, num_bins, niter=max(1, max_iter), seed=int(seed), gpu=use_gpu, verbose=False,
            # Use every point (FAISS subsamples to 256 per centroid by default) and do
            # not warn about "too few" points per centroid.
            max_points_per_centroid=n, min_points_per_centroid=1,
        )
        kmeans.train(column, init_centroids=np.ascontiguousarray(start[dim].reshape(-1, 1)))
        centers[dim] = np.sort(kmeans.centroids.reshape(-1))

    if use_gpu:
        for dim in range(d):
            fit_dimension(dim)
        return centers

    # FAISS cannot cluster several 1-D problems in one call, and one d=1 problem is too
    # small for OpenMP to pay off (on busy cores it is many times slower): run whole
    # dimensions side by side instead, one OpenMP thread each (FAISS releases the GIL).
    def fit_single_threaded(dims) -> None:
        faiss.omp_set_num_threads(1)  # per calling thread
        for dim in dims:
            fit_dimension(dim)

    from concurrent.futures import ThreadPoolExecutor

    workers = min(threads, d)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fit_single_threaded, [range(w, d, workers) for w in range(workers)]))
    return centers


def _fit_exact(latents: np.ndarray, num_bins: int, threads: int) -> np.ndarray:
    import faiss

    n, d = latents.shape
    centers = np.empty((d, num_bins), np.float32)
    for dim in range(d):
        column = np.ascontiguousarray(latents[:, dim])
        few = _few_distinct(column, num_bins)
        if few is not None:
            centers[dim] = few
            continue
        row = np.empty(num_bins, np.float32)
        try:
            faiss.kmeans1d(faiss.swig_ptr(column), n, num_bins, faiss.swig_ptr(row))
        except RuntimeError:
            # faiss's final assignment can leave a cluster empty when repeated values
            # straddle an edge; the native programme over distinct values is exact too.
            row, _, _ = _native_kmeans1d(column.reshape(-1, 1), num_bins, 0, 0.0, "coarse_exact", 0, threads)
        centers[dim] = np.sort(row.reshape(-1))
    return centers


# -- quality -------------------------------------------------------------------------------------
def inertia(latents, centers, chunk_rows: int = 65536) -> np.ndarray:
    """Per-dimension sum of squared distances to the nearest center, (D,) float64."""
    from jetfast.ops import dequantize, quantize

    latents = as_latents(latents, "inertia")
    centers = np.ascontiguousarray(centers, dtype=np.float32)
    if centers.ndim != 2 or centers.shape[0] != latents.shape[1]:
        raise ValueError(f"inertia: centers must be (D, K) with D={latents.shape[1]}; got {centers.shape}")
    total = np.zeros(latents.shape[1], np.float64)
    for begin in range(0, latents.shape[0], chunk_rows):
        block = latents[begin : begin + chunk_rows]
        nearest = dequantize(quantize(block, centers), centers)
        total += np.square(block.astype(np.float64) - nearest).sum(axis=0)
    return total


def quantization_error(latents, centers) -> dict:
    """RMS of z - dequantize(quantize(z)) per dimension, absolute and relative to the std of z."""
    latents = as_latents(latents, "quantization_error")
    n = max(1, latents.shape[0])
    rms = np.sqrt(inertia(latents, centers) / n)
    std = latents.astype(np.float64).std(axis=0)
    relative = np.divide(rms, std, out=np.zeros_like(rms), where=std > 0)
    return {"rms": rms, "latent_std": std, "relative_rms": relative}


# -- the bins file -------------------------------------------------------------------------------
def save_bins(path: str | os.PathLike, centers: np.ndarray, **metadata) -> Path:
    """Write ``bins.npz`` atomically: ``centers`` (D, K) float32 plus metadata arrays/scalars."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    arrays = {"centers": np.ascontiguousarray(centers, dtype=np.float32)}
    for key, value in metadata.items():
        arrays[key] = np.asarray(value)
    with open(tmp, "wb") as handle:  # a file object: np.savez would append ".npz" to a name
        np.savez(handle, **arrays)
    os.replace(tmp, path)
    return path


def load_bins(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """``(centers, metadata)`` from a ``bins.npz`` (or a run directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = RunDir(path).bins_path
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: fit the bins first with `jetfast fit-bins RUN_DIR --data FILE`")
    with np.load(path) as bins:
        if "centers" not in bins.files:
            raise RunDirError(f"{path} holds no 'centers' array; it was not written by `jetfast fit-bins`")
        centers = np.ascontiguousarray(bins["centers"], dtype=np.float32)
        metadata = {key: (bins[key].item() if bins[key].ndim == 0 else bins[key]) for key in bins.files if key != "centers"}
    if centers.ndim != 2 or centers.shape[1] < 2 or not np.all(np.diff(centers, axis=1) >= 0):
        raise RunDirError(f"{path}: centers must be (D, K >= 2) with rows sorted ascending; got shape {centers.shape}")
    return centers, metadata
