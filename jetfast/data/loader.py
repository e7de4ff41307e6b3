"""Batches of jet images in model layout, read straight from the HDF5 file.

:class:`JetLoader` turns a jet file (see :mod:`jetfast.data.format`) into batches of
``(B, 3, 128, 128)`` float32 tensors, padded, channels first and already passed
through the :class:`~jetfast.data.transforms.IntensityTransform`, plus the small
per-jet keys (``y``, ``pt``, ``m0``) and the file ``index`` of every jet.

Two backends share one interface and give the same batches:

* ``"native"``: the C++ prefetcher in ``jetfast._C``. It reads the chunk index once
  with the HDF5 C library, then worker threads ``pread`` raw chunks, decode them
  (LZF, deflate, shuffle) without any lock and write whole batches in model layout
  into reusable buffers, ``prefetch`` batches ahead of the consumer.
* ``"h5py"``: whole-chunk reads through h5py in the same chunk-aware order, used
  when the extension was built without HDF5 or when the file uses a layout the
  C++ reader does not decode (filters other than lzf/gzip/shuffle, dtypes other
  than float32, compact layouts). ``loader.backend`` says which one runs, and a
  one-time log warning says why when it is h5py.

Any chunk shape works, but chunks that hold whole images, e.g. ``(32, 125, 125, 3)``,
are ~10x cheaper per jet than chunks that cut the images (h5py's automatic
chunking gives ``(4354, 4, 4, 1)``-like tiles): rewrite such a file once with
whole-image chunks when it is read for many epochs.

Every jet is checked against the data contract (:func:`jetfast.data.format.check_jets`)
the first time the loader reads it: a jet with a NaN, infinite, negative or absurdly large
pixel (a damaged chunk that still decodes, a file written wrong) is a
:class:`~jetfast.errors.JetFileError` naming the file and the jets, on both backends. The
check reads every pixel, about the CPU time of decoding a sparse jet, so it is done once
per jet, not every epoch. With a ``transform`` it reads the transformed values against
the transformed bounds, so a negative pixel too small to move its transformed value off
that of zero energy (float32 rounding) passes as the zero it becomes.

Shuffling is chunk-aware: the order of the chunks is shuffled, then jets are mixed
within a window of a few consecutive chunks, so every chunk is decoded once per
epoch while batches still mix jets from many places in the file.

Batch lifetime (native backend): each batch's images live in a buffer owned by the
prefetcher and are handed to torch without a copy. The buffer goes back to the
ring only when the last Python reference to the tensor (and to anything viewing
it) is gone, so a batch stays valid for as long as you keep it; keeping many
batches alive simply costs memory. No ``.clone()`` is needed.

Distributed runs: when ``torch.distributed`` is initialised (or ``RANK`` and
``WORLD_SIZE`` are set, as under ``torchrun``) every rank reads a disjoint,
equal-sized slice of the same shuffled epoch order. To keep the number of steps
equal on every rank, the last ``len(indices) % world_size`` jets of each epoch's
order are dropped (different jets each epoch when shuffling).
"""

from __future__ import annotations

import logging
import os
import weakref

import numpy as np
import torch

from jetfast.data.format import (
    CHANNELS,
    IMAGE_KEY,
    IMAGE_SIZE,
    MAX_PIXEL_GEV,
    check_jets,
    read_images,
    validate_jet_file,
)
from jetfast.data.transforms import IntensityTransform, pad_to_model
from jetfast.errors import JetFileError, JetReadError

log = logging.getLogger(__name__)

# Jets are mixed within this many consecutive (shuffled) chunks: enough to mix
# labels and neighbourhoods, few enough that a chunk is decoded once per epoch.
SHUFFLE_WINDOW_CHUNKS = 4
# Contiguous datasets have no chunks; shuffle them in blocks of this many rows.
CONTIGUOUS_BLOCK_ROWS = 32

_warned_fallback: set[str] = set()


def distributed_shard(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size) from the arguments, ``torch.distributed`` or the torchrun environment."""
    if rank is not None or world_size is not None:
        rank, world_size = int(rank or 0), int(world_size or 1)
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    else:
        rank, world_size = 0, 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid distributed shard: rank={rank}, world_size={world_size}")
    return rank, world_size


def chunk_aware_order(
    indices: np.ndarray,
    chunk_rows: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    window_chunks: int = SHUFFLE_WINDOW_CHUNKS,
) -> np.ndarray:
    """The epoch's reading order of the (sorted, unique) file ``indices``.

    Without shuffling: file order. With shuffling: the chunks that hold any of the
    indices are put in a random order, then jets are permuted within windows of
    ``window_chunks`` consecutive chunks of that order. Same (seed, epoch), same order.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if not shuffle or len(indices) == 0:
        return indices.copy()
    rng = np.random.default_rng([int(seed), int(epoch)])
    chunks, chunk_of_jet = np.unique(indices // chunk_rows, return_inverse=True)
    chunk_rank = np.empty(len(chunks), np.int64)
    chunk_rank[rng.permutation(len(chunks))] = np.arange(len(chunks))
    window = chunk_rank[chunk_of_jet] // window_chunks
    # lexsort: last key is primary -> by window, then by a random key within the window.
    return indices[np.lexsort((rng.random(len(indices)), window))]


def _transformed_bounds(transform: IntensityTransform) -> tuple[np.ndarray, np.ndarray]:
    """The contract's pixel bounds, 0 and MAX_PIXEL_GEV, through ``transform``, per channel: the
    transform is increasing, so transformed batches are checked against these. A zero pixel maps
    exactly onto the lower bound, as the prefetcher computes it the same way."""
    bounds = torch.tensor([0.0, MAX_PIXEL_GEV]).repeat(len(CHANNELS), 1).view(1, len(CHANNELS), 2, 1)
    transformed = transform.forward(bounds)[0, :, :, 0].numpy()  # (3, 2)
    return transformed[:, 0].copy(), transformed[:, 1].copy()


def _native_module():
    from jetfast import _ext

    c = _ext._C
    if c is None or not getattr(c, "built_with_prefetch", False) or not hasattr(c, "Prefetcher"):
        return None
    return c


class JetLoader:
    """Iterate over a jet file in batches of model-layout tensors.

    Args:
        path: the HDF5 jet file (layout of :mod:`jetfast.data.format`).
        batch_size: jets per batch.
        indices: file indices to read (any order, duplicates ignored); default all.
        shuffle: chunk-aware shuffle, new for every epoch (see :meth:`set_epoch`).
        seed: shuffling seed; same seed and epoch give the same order.
        drop_last: drop the last batch when it has fewer than ``batch_size`` jets.
        num_threads: decoding threads of the native backend (default: usable cores).
        prefetch: batches prepared ahead of the consumer.
        transform: an :class:`IntensityTransform` applied in the same pass, or None
            for physical units (only pad 125->128 and channels first).
        keys: datasets to return; ``"X_jets"`` becomes the image tensor, the others
            (``y``, ``pt``, ``m0``: 1-D, read once into memory) are indexed per batch.
        backend: ``"auto"`` (native when it can read the file), ``"native"`` or ``"h5py"``.
        rank, world_size: the distributed shard; default from torch.distributed/torchrun.

    Each batch is a dict ``{"X_jets": (B,3,128,128) float32, "y": (B,), ..., "index": (B,) int64}``.
    Attributes: ``backend``, ``num_jets`` (jets per epoch on this rank), ``file_jets``
    (jets in the file), ``epoch``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int,
        indices=None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_threads: int | None = None,
        prefetch: int = 4,
        transform: IntensityTransform | None = None,
        keys=(IMAGE_KEY, "y"),
        backend: str = "auto",
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.path = os.fspath(path)
        self.keys = tuple(keys)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if int(prefetch) < 1:
            raise ValueError(f"prefetch must be >= 1; got {prefetch}")
        if transform is not None and not isinstance(transform, IntensityTransform):
            raise TypeError(f"transform must be an IntensityTransform or None; got {type(transform).__name__}")
        if backend not in ("auto", "native", "h5py"):
            raise ValueError(f"backend must be 'auto', 'native' or 'h5py'; got {backend!r}")
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.prefetch = int(prefetch)
        self.num_threads = int(num_threads) if num_threads else len(os.sched_getaffinity(0))
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1; got {num_threads}")
        self.transform = transform
        self._pixel_bounds = (0.0, MAX_PIXEL_GEV) if transform is None else _transformed_bounds(transform)
        self.epoch = 0
        self.rank, self.world_size = distributed_shard(rank, world_size)
        self._native = None
        self._h5file = None
        self._generation = 0
        self._closed = False

        self.file_jets = validate_jet_file(self.path, self.keys)
        self._checked = np.zeros(self.file_jets, bool)  # jets that passed the contract check
        self._read_layout_and_scalars()
        self._select(indices)

        self.backend = "h5py"
        if IMAGE_KEY in self.keys and backend != "h5py":
            self._open_native(required=(backend == "native"))
        self._finalizer = weakref.finalize(self, JetLoader._release, self._native, self._h5file)

    # -- construction ----------------------------------------------------------------------
    def _read_layout_and_scalars(self):
        import h5py

        self.scalars: dict[str, np.ndarray] = {}
        with h5py.File(self.path, "r") as f:
            ds = f[IMAGE_KEY]
            self.image_dtype = ds.dtype
            if ds.dtype.kind not in "fiu":
                raise JetFileError(f"{self.path}:{IMAGE_KEY} has dtype {ds.dtype}; expected float32 pixels")
            self.chunk_rows = ds.chunks[0] if ds.chunks else CONTIGUOUS_BLOCK_ROWS
            for key in self.keys:
                if key == IMAGE_KEY:
                    continue
                values = f[key][()]
                if values.ndim != 1:
                    raise JetFileError(f"{self.path}:{key} has shape {values.shape}; expected ({self.file_jets},)")
                self.scalars[key] = values

    def _select(self, indices):
        if indices is None:
            selected = np.arange(self.file_jets, dtype=np.int64)
        else:
            raw = np.asarray(indices)
            if raw.dtype == bool:
                if raw.shape != (self.file_jets,):
                    raise ValueError(f"boolean indices need shape ({self.file_jets},); got {raw.shape}")
                raw = np.flatnonzero(raw)
            if raw.size and raw.dtype.kind not in "iu":
                raise TypeError(f"indices must be integers; got dtype {raw.dtype}")
            selected = np.unique(raw.astype(np.int64).ravel())
            if selected.size and (selected[0] < 0 or selected[-1] >= self.file_jets):
                bad = selected[0] if selected[0] < 0 else selected[-1]
                raise IndexError(f"index {bad} out of range for {self.path} with {self.file_jets} jets")
        self.indices = selected
        per_rank = len(selected) // self.world_size
        self.num_jets = per_rank

    def _open_native(self, required: bool):
        c = _native_module()
        reason = None
        if c is None:
            reason = "jetfast._C was built without the HDF5 prefetcher (install libhdf5-dev and `make build`)"
        else:
            t = self.transform
            try:
                self._native = c.Prefetcher(
                    self.path,
                    IMAGE_KEY,
                    self.num_threads,
                    self.prefetch,
                    list(t.scale) if t else [],
                    list(t.mean) if t else [],
                    list(t.std) if t else [],
                )
            except c.UnsupportedLayout as exc:
                reason = str(exc)
            except c.ReadError as exc:
                raise JetReadError(str(exc)) from None
        if self._native is not None:
            self.backend = "native"
            self._read_error = c.ReadError
            return
        if required:
            raise RuntimeError(f"native backend requested but unavailable: {reason}")
        if reason not in _warned_fallback:
            _warned_fallback.add(reason)
            log.warning("JetLoader: reading %s with h5py (slower): %s", self.path, reason)

    # -- iteration -------------------------------------------------------------------------
    def __len__(self) -> int:
        full, rest = divmod(self.num_jets, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration's shuffle (later iterations count on from it)."""
        self.epoch = int(epoch)

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """File indices this rank reads in ``epoch`` (default: the next one), in order."""
        epoch = self.epoch if epoch is None else int(epoch)
        order = chunk_aware_order(self.indices, self.chunk_rows, self.seed, epoch, self.shuffle)
        # Contiguous slices keep each rank's reads within its own chunks.
        start = self.rank * self.num_jets
        order = order[start : start + self.num_jets]
        if self.drop_last:
            order = order[: len(order) - len(order) % self.batch_size]
        return order

    def __iter__(self):
        if self._closed:
            raise RuntimeError("this JetLoader is closed")
        order = self.epoch_order()
        self.epoch += 1
        self._generation += 1
        if self.backend == "native":
            return self._iter_native(order, self._generation)
        return self._iter_h5py(order, self._generation)

    def _batch_dict(self, images: torch.Tensor | None, index: np.ndarray) -> dict:
        batch = {}
        if images is not None:
            if not self._checked[index].all():
                check_jets(images, index, self.path, *self._pixel_bounds)
                self._checked[index] = True
            batch[IMAGE_KEY] = images
        for key, values in self.scalars.items():
            batch[key] = torch.from_numpy(values[index])
        batch["index"] = torch.from_numpy(index)
        return batch

    def _check_current(self, generation: int):
        if self._closed:
            raise RuntimeError("this JetLoader was closed during iteration")
        if generation != self._generation:
            raise RuntimeError("a newer iteration over this JetLoader started; only the newest one can be used")

    def _iter_native(self, order: np.ndarray, generation: int):
        native = self._native
        native.start(order, self.batch_size)
        try:
            for start in range(0, len(order), self.batch_size):
                self._check_current(generation)
                try:
                    images = native.next()
                except self._read_error as exc:
                    raise JetReadError(str(exc)) from None
                if images is None:  # stopped under us: only close() does that
                    raise RuntimeError("this JetLoader was closed during iteration")
                yield self._batch_dict(torch.from_numpy(images), order[start : start + self.batch_size])
        finally:
            if generation == self._generation and self._native is not None:
                native.stop()

    def _iter_h5py(self, order: np.ndarray, generation: int):
        import h5py

        if IMAGE_KEY not in self.keys:
            for start in range(0, len(order), self.batch_size):
                yield self._batch_dict(None, order[start : start + self.batch_size])
            return
        if self._h5file is None:
            self._h5file = h5py.File(self.path, "r")
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, JetLoader._release, self._native, self._h5file)
        ds = self._h5file[IMAGE_KEY]
        rows = self.chunk_rows
        starts = range(0, len(order), self.batch_size)
        # How many batches still need each chunk: a chunk shared by two batches is kept
        # decoded until the second one is built, so every chunk is read once per epoch.
        users: dict[int, int] = {}
        for start in starts:
            for c in np.unique(order[start : start + self.batch_size] // rows):
                users[int(c)] = users.get(int(c), 0) + 1
        cache: dict[int, np.ndarray] = {}
        for start in starts:
            self._check_current(generation)
            index = order[start : start + self.batch_size]
            images = np.empty((len(index), IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
            chunk_of = index // rows
            for c in np.unique(chunk_of):
                c = int(c)
                block = cache.pop(c, None)
                if block is None:
                    block = read_images(ds, c * rows, min((c + 1) * rows, self.file_jets), self.path)
                users[c] -= 1
                if users[c] > 0:
                    cache[c] = block
                here = np.flatnonzero(chunk_of == c)
                images[here] = block[index[here] - c * rows]
            tensor = torch.from_numpy(images)
            tensor = (self.transform.to_model(tensor) if self.transform else pad_to_model(tensor)).contiguous()
            yield self._batch_dict(tensor, index)

    # -- lifecycle -------------------------------------------------------------------------
    @staticmethod
    def _release(native, h5file):
        if native is not None:
            native.stop()
        if h5file is not None:
            try:
                h5file.close()
            except Exception:  # noqa: BLE001 - closing at interpreter exit may race h5py's own teardown
                pass

    def close(self) -> None:
        """Stop the worker threads and close the file; the loader cannot be iterated afterwards."""
        self._closed = True
        self._finalizer()
        self._native = None
        self._h5file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()

    def __repr__(self) -> str:
        return (
            f"JetLoader({self.path!r}, batch_size={self.batch_size}, jets={self.num_jets}/{self.file_jets}, "
            f"batches={len(self)}, backend={self.backend!r}, shuffle={self.shuffle}, epoch={self.epoch}, "
            f"rank={self.rank}/{self.world_size})"
        )
