"""JetLoader against h5py reads of the same jets: layouts, orders, sharding, errors, lifecycle.

Every batch is compared with an independent reference: the jets h5py reads for the
batch's ``index``, padded and transformed by :mod:`jetfast.data.transforms`.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import re
import shutil

import h5py
import numpy as np
import pytest
import torch

from jetfast._ext import _C
from jetfast.errors import JetFileError
from jetfast.data.loader import JetLoader, JetReadError, chunk_aware_order
from jetfast.data.transforms import IntensityTransform, pad_to_model
from tests.jetfiles import damage_chunk, jet_images, write_jet_file

HAS_PREFETCH = bool(_C is not None and getattr(_C, "built_with_prefetch", False))
BACKENDS = [
    pytest.param("native", marks=pytest.mark.skipif(not HAS_PREFETCH, reason="jetfast._C built without the HDF5 prefetcher")),
    "h5py",
]
LAYOUTS = {
    "lzf": dict(compression="lzf"),
    "gzip": dict(compression="gzip"),
    "gzip+shuffle": dict(compression="gzip", shuffle=True),
    "lzf+shuffle": dict(compression="lzf", shuffle=True),
    "contiguous": dict(chunk=None),
    # Chunks that cut the images (partial at every edge), as h5py's automatic chunking makes.
    "lzf tiles": dict(chunks=(9, 16, 50, 2), compression="lzf"),
    "gzip auto": dict(chunks=True, compression="gzip", shuffle=True),
}
N = 101  # with chunks of 7: the last chunk is partial and no batch size divides N


@pytest.fixture(scope="module")
def jets(module_seed):
    images, labels = jet_images(N, seed=module_seed)
    # A few incompressible jets: LZF stores their chunk raw (filter mask bit 0 set).
    images[7:14] = np.random.default_rng(module_seed + 1).random((7, 125, 125, 3), dtype=np.float32)
    return images, labels


@pytest.fixture(scope="module")
def files(jets, tmp_path_factory):
    images, labels = jets
    root = tmp_path_factory.mktemp("jets")
    paths = {}
    for name, layout in LAYOUTS.items():
        paths[name] = root / f"{name}.h5"
        if "chunks" in layout:
            with h5py.File(paths[name], "w") as f:
                f.create_dataset("X_jets", data=images, **layout)
                f["y"] = labels
            continue
        write_jet_file(paths[name], images=images, labels=labels, **{"chunk": 7, **layout})
    return paths


def reference(images, index, transform=None):
    physical = torch.from_numpy(np.ascontiguousarray(images[index]))
    return transform.to_model(physical) if transform is not None else pad_to_model(physical)


def assert_batches_match(loader, images, labels, transform=None):
    seen = []
    for batch in loader:
        index = batch["index"].numpy()
        assert batch["index"].dtype == torch.int64
        x = batch["X_jets"]
        assert x.dtype == torch.float32 and x.shape == (len(index), 3, 128, 128) and x.is_contiguous()
        if transform is None:
            assert torch.equal(x, reference(images, index)), "images differ from h5py (no transform)"
        else:
            torch.testing.assert_close(x, reference(images, index, transform), rtol=2e-6, atol=2e-6)
        np.testing.assert_array_equal(batch["y"].numpy(), labels[index])
        seen.append(index)
    return np.concatenate(seen) if seen else np.empty(0, np.int64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_h5py(files, jets, backend, layout):
    images, labels = jets
    transform = IntensityTransform.fit(images[20:60])
    for t in (None, transform):
        with JetLoader(files[layout], 16, transform=t, backend=backend, seed=3) as loader:
            assert loader.backend == backend
            seen = assert_batches_match(loader, images, labels, t)
        np.testing.assert_array_equal(np.sort(seen), np.arange(N))


@pytest.mark.parametrize("backend", BACKENDS)
def test_extra_keys_and_batch_sizes(files, jets, backend):
    images, labels = jets
    with h5py.File(files["lzf"], "r") as f:
        pt, m0 = f["pt"][()], f["m0"][()]
    cases = [(16, False), (16, True), (101, True), (500, False), (500, True)]
    if backend == "native":  # batches of one jet: cheap natively, slow through torch ops per batch
        cases.append((1, False))
    for batch_size, drop_last in cases:
        loader = JetLoader(files["lzf"], batch_size, drop_last=drop_last, keys=("X_jets", "y", "pt", "m0"), backend=backend)
        batches = list(loader)
        assert len(batches) == len(loader)
        sizes = [len(b["index"]) for b in batches]
        expected = [batch_size] * (N // batch_size) + ([] if drop_last or N % batch_size == 0 else [N % batch_size])
        assert sizes == expected
        for b in batches:  # batches kept alive together: buffer reuse would corrupt the early ones
            index = b["index"].numpy()
            assert torch.equal(b["X_jets"], reference(images, index))
            np.testing.assert_array_equal(b["pt"].numpy(), pt[index])
            np.testing.assert_array_equal(b["m0"].numpy(), m0[index])
        loader.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_order_subset_epochs_and_determinism(files, jets, backend, rng):
    images, labels = jets
    subset = rng.choice(N, size=37, replace=False)
    loader = JetLoader(files["gzip+shuffle"], 8, indices=subset, seed=11, backend=backend)
    assert loader.num_jets == 37 and len(loader) == 5
    orders = []
    for _ in range(3):
        order = assert_batches_match(loader, images, labels)
        np.testing.assert_array_equal(np.sort(order), np.sort(subset))
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1]), "each epoch needs its own shuffle"
    loader.set_epoch(1)
    np.testing.assert_array_equal(np.concatenate([b["index"].numpy() for b in loader]), orders[1])
    twin = JetLoader(files["lzf"], 8, indices=subset, seed=11, backend=backend)
    np.testing.assert_array_equal(np.concatenate([b["index"].numpy() for b in twin]), orders[0])
    in_order = JetLoader(files["lzf"], 8, indices=subset, shuffle=False, backend=backend)
    np.testing.assert_array_equal(np.concatenate([b["index"].numpy() for b in in_order]), np.sort(subset))


def test_chunk_aware_order_mixes_within_windows():
    indices = np.arange(0, 1000, 3)
    order = chunk_aware_order(indices, 7, seed=5, epoch=2, window_chunks=4)
    np.testing.assert_array_equal(np.sort(order), indices)
    np.testing.assert_array_equal(order, chunk_aware_order(indices, 7, seed=5, epoch=2, window_chunks=4))
    assert not np.array_equal(order, chunk_aware_order(indices, 7, seed=5, epoch=3, window_chunks=4))
    # Locality: a chunk's jets all fall within one window of 4 chunks' worth of jets.
    chunks = order // 7
    for c in np.unique(chunks):
        where = np.flatnonzero(chunks == c)
        assert where[-1] - where[0] < 4 * 3
    # Mixing: neighbours in the order usually come from different chunks.
    assert np.mean(chunks[1:] != chunks[:-1]) > 0.5


def test_sharding_is_disjoint_equal_and_covering(files, monkeypatch):
    world = 3
    shards = [JetLoader(files["lzf"], 5, rank=r, world_size=world, seed=2) for r in range(world)]
    orders = [np.concatenate([b["index"].numpy() for b in s]) for s in shards]
    assert len({len(o) for o in orders}) == 1 and len({len(s) for s in shards}) == 1
    everything = np.concatenate(orders)
    assert len(np.unique(everything)) == len(everything) == N - N % world
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    from_env = JetLoader(files["lzf"], 5, seed=2)
    assert (from_env.rank, from_env.world_size) == (1, 3)
    np.testing.assert_array_equal(np.concatenate([b["index"].numpy() for b in from_env]), orders[1])


def chunk_span(path, chunk):
    with h5py.File(path, "r") as f:
        info = f["X_jets"].id.get_chunk_info(chunk)
        return info.byte_offset, info.size


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["lzf", "gzip+shuffle"])
def test_corrupt_chunk_raises(files, tmp_path, backend, layout):
    path = tmp_path / "corrupt.h5"
    shutil.copy(files[layout], path)
    offset, size = chunk_span(path, 3)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * min(size, 64))
    loader = JetLoader(path, 10, shuffle=False, backend=backend)
    with pytest.raises(JetReadError, match="chunk 3" if backend == "native" else "corrupt|chunk"):
        for _ in loader:
            pass
    # The loader survives the error: the next epoch reports it again instead of hanging.
    with pytest.raises(JetReadError):
        list(loader)
    loader.close()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transformed", [False, True], ids=["GeV", "transformed"])
def test_random_bytes_inside_a_chunk_are_never_read_silently(files, tmp_path, backend, transformed):
    path = tmp_path / "damaged.h5"
    shutil.copy(files["lzf"], path)
    damage_chunk(path, 2, "middle", nbytes=4096)
    transform = IntensityTransform(scale=(1.0, 0.5, 0.02), mean=(0.4, 0.3, 0.2), std=(0.5, 0.6, 0.7)) if transformed else None
    with pytest.raises((JetReadError, JetFileError), match="damaged.h5") as caught:
        list(JetLoader(path, 10, shuffle=False, backend=backend, transform=transform))
    if caught.type is JetFileError:  # decoded, to garbage: the jets are named, all of them in chunk 2
        named = {int(j) for j in re.findall(r"\d+", caught.value.args[0].split(" have ")[0].split("jet(s)")[1])}
        assert named and named <= set(range(14, 21)), caught.value


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transformed", [False, True], ids=["GeV", "transformed"])
def test_jets_that_break_the_contract_are_refused_by_index(jets, tmp_path, backend, transformed):
    images, labels = jets
    images = images[:40].copy()
    images[3, 60, 60, 1] = np.nan
    images[17, 0, 0, 2] = -np.inf
    images[18, 1, 2, 0] = -0.25
    images[30, 124, 124, 1] = 2e5  # (3.3e38 would overflow to inf through the transform)
    write_jet_file(tmp_path / "bad.h5", images=images, labels=labels[:40], chunk=8)
    transform = IntensityTransform.fit(np.nan_to_num(images, nan=0, posinf=0, neginf=0).clip(0, 1e3)) if transformed else None
    expected = {0: "jet(s) 3 have NaN or infinite", 2: "jet(s) 17 have NaN or infinite pixels; jet(s) 18 have negative",
                3: "jet(s) 30 have pixels above 100000 GeV"}
    for chunk in range(5):  # chunk by chunk, each bad one refused by itself
        loader = JetLoader(tmp_path / "bad.h5", 8, indices=np.arange(8 * chunk, 8 * chunk + 8), shuffle=False,
                           backend=backend, transform=transform)
        if chunk in expected:
            for _ in range(2):  # every epoch: a refused jet is never taken for checked
                with pytest.raises(JetFileError, match=re.escape(f"bad.h5: {expected[chunk]}")):
                    list(loader)
        else:
            assert len(list(loader)) == 1
        loader.close()


def test_a_clean_file_passes_the_contract_check_transformed_or_not(files, jets):
    images, _ = jets
    transform = IntensityTransform.fit(images)
    for backend in ("native", "h5py") if HAS_PREFETCH else ("h5py",):
        for t in (None, transform):
            assert sum(len(b["index"]) for b in JetLoader(files["lzf"], 16, backend=backend, transform=t)) == N


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_file_raises(files, tmp_path, backend):
    path = tmp_path / "truncated.h5"
    shutil.copy(files["lzf"], path)
    loader = JetLoader(path, 10, shuffle=False, backend=backend)
    offset, _ = chunk_span(path, 5)
    os.truncate(path, offset + 10)  # truncated after the index was read
    with pytest.raises(OSError, match="truncated|chunk"):
        list(loader)
    loader.close()
    with pytest.raises((JetFileError, JetReadError)):
        JetLoader(path, 10)


def test_bad_input_is_a_clear_error(tmp_path, files):
    with pytest.raises(FileNotFoundError):
        JetLoader(tmp_path / "missing.h5", 4)
    with pytest.raises(JetFileError, match="no dataset 'm0'"):
        with h5py.File(tmp_path / "nom0.h5", "w") as f:
            f["X_jets"] = np.zeros((3, 125, 125, 3), np.float32)
            f["y"] = np.zeros(3, np.float32)
        JetLoader(tmp_path / "nom0.h5", 4, keys=("X_jets", "y", "m0"))
    with h5py.File(tmp_path / "shape.h5", "w") as f:
        f["X_jets"] = np.zeros((3, 3, 125, 125), np.float32)
        f["y"] = np.zeros(3, np.float32)
    with pytest.raises(JetFileError, match="shape"):
        JetLoader(tmp_path / "shape.h5", 4)
    with h5py.File(tmp_path / "bzip2.h5", "w") as f:
        f.create_dataset("X_jets", data=np.zeros((3, 125, 125, 3), np.float32), chunks=(1, 125, 125, 3),
                         compression=307, allow_unknown_filter=True)
        f["y"] = np.zeros(3, np.float32)
    with pytest.raises(JetFileError, match="filter 307"):
        JetLoader(tmp_path / "bzip2.h5", 4)
    with pytest.raises(IndexError):
        JetLoader(files["lzf"], 4, indices=[0, N])
    with pytest.raises(ValueError):
        JetLoader(files["lzf"], 0)


def test_other_layouts_fall_back_to_h5py(tmp_path, jets, caplog):
    images, labels = jets
    path = tmp_path / "f64.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("X_jets", data=images[:30].astype(np.float64), chunks=(4, 125, 125, 3), compression="lzf")
        f["y"] = labels[:30]
    loader = JetLoader(path, 8)
    assert loader.backend == "h5py"
    assert_batches_match(loader, images[:30].astype(np.float64).astype(np.float32), labels[:30])


@pytest.mark.skipif(not HAS_PREFETCH, reason="jetfast._C built without the HDF5 prefetcher")
def test_native_equals_fallback_and_reuses_buffers(files, jets):
    images, labels = jets
    transform = IntensityTransform.fit(images[:40])
    native = JetLoader(files["lzf+shuffle"], 12, transform=transform, backend="native", seed=9, prefetch=3)
    fallback = JetLoader(files["lzf+shuffle"], 12, transform=transform, backend="h5py", seed=9)
    for _ in range(2):
        for a, b in zip(native, fallback, strict=True):
            assert torch.equal(a["index"], b["index"])
            torch.testing.assert_close(a["X_jets"], b["X_jets"], rtol=2e-6, atol=2e-6)
    # Batches dropped by the consumer go back to the ring instead of piling up.
    assert native._native.describe()["buffers_allocated"] <= 3 + 3


def native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not HAS_PREFETCH, reason="jetfast._C built without the HDF5 prefetcher")
def test_abandoned_iterations_do_not_hang_or_leak(files, jets):
    images, _ = jets
    faulthandler.dump_traceback_later(120, exit=True)  # a hang fails loudly instead of blocking CI
    try:
        baseline = native_threads()
        loader = JetLoader(files["lzf"], 4, num_threads=2, prefetch=3)
        for i in range(200):
            it = iter(loader)
            for _ in range(i % 4):
                batch = next(it)
            del it
        assert torch.equal(batch["X_jets"], reference(images, batch["index"].numpy()))
        for _ in loader:
            break
        with pytest.raises(ZeroDivisionError):
            for _ in loader:
                1 / 0
        it = iter(loader)
        next(it)
        del loader  # the iterator keeps it alive; dropping both stops the workers
        del it
        gc.collect()
        assert native_threads() == baseline
        with JetLoader(files["gzip"], 4) as loader:
            next(iter(loader))
        assert native_threads() == baseline
        with pytest.raises(RuntimeError, match="closed"):
            iter(loader)
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.mark.skipif(not HAS_PREFETCH, reason="jetfast._C built without the HDF5 prefetcher")
def test_superseded_iterator_is_an_error(files):
    loader = JetLoader(files["lzf"], 4)
    first = iter(loader)
    next(first)
    second = iter(loader)
    next(second)
    with pytest.raises(RuntimeError, match="newer iteration"):
        next(first)
    assert len(list(second)) == len(loader) - 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_outlive_close(files, jets, backend):
    images, _ = jets
    loader = JetLoader(files["gzip"], 9, backend=backend)
    it = iter(loader)
    kept = [next(it), next(it)]
    loader.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(it)
    del it, loader
    gc.collect()
    for batch in kept:
        assert torch.equal(batch["X_jets"], reference(images, batch["index"].numpy()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_file_and_unwritten_chunks(tmp_path, jets, backend):
    images, _ = jets
    with h5py.File(tmp_path / "sparse.h5", "w") as f:
        ds = f.create_dataset("X_jets", (20, 125, 125, 3), np.float32, chunks=(4, 125, 125, 3), compression="lzf")
        ds[:6] = images[:6]  # chunks 2..4 never written: they read as the fill value, zero
        f["y"] = np.zeros(20, np.float32)
    expected = np.zeros((20, 125, 125, 3), np.float32)
    expected[:6] = images[:6]
    loader = JetLoader(tmp_path / "sparse.h5", 6, backend=backend)
    seen = assert_batches_match(loader, expected, np.zeros(20, np.float32))
    np.testing.assert_array_equal(np.sort(seen), np.arange(20))
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_dataset("X_jets", (0, 125, 125, 3), np.float32, chunks=(4, 125, 125, 3), maxshape=(None, 125, 125, 3))
        f["y"] = np.zeros(0, np.float32)
    empty = JetLoader(tmp_path / "empty.h5", 4, backend=backend)
    assert len(empty) == 0 and empty.num_jets == 0 and list(empty) == []
