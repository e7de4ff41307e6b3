"""Large-scale generation: codes -> latents -> jet images -> HDF5 in the input layout.

Per block of jets: sample codes with the KV-cached Transformer, dequantize them
with the run's bins, decode them with the VAE into jets in GeV, 125x125 channels
last (``decode="sample"``: every pixel's hit and intensity drawn from the sparse
observation model, HCAL spread over its towers by the detector model's own
layout; ``"mean"``: the expected image), compute pT and mass from the image, and
write the block into the output file. Memory is one block, whatever N is.

Reproducibility and resuming. Block ``b`` of rank ``r`` is drawn from a seed that
depends only on ``(seed, r, b)``, so a block is the same whether it is made in
one run or after a restart. The output is written as ``OUT.partial`` (HDF5 in
SWMR mode, so a killed writer leaves a readable file) with a progress counter
that advances only after a block is flushed; ``--resume`` continues from the
counter, and the finished file is renamed to ``OUT``. A block interrupted half
way is simply written again.

Under torchrun, rank r writes ``OUT`` with ``.rank{r}-of-{W}`` before the suffix
(its own share of the jets, its own seed stream), and rank 0 then writes ``OUT``
as an HDF5 virtual dataset that presents all shards as one file with the usual keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

import jetfast
from jetfast import distributed
from jetfast.bins import load_bins
from jetfast.data.format import CHANNELS, IMAGE_KEY, IMAGE_SIZE, REQUESTED_KEYS, SCALAR_KEYS
from jetfast.data.kinematics import jet_pt_mass
from jetfast.errors import GenerationMismatch, InvalidArgument, RunDirError
from jetfast.generation.conditions import CLASS_CHOICES, Conditions, LikeJets, complete, training_ranges
from jetfast.generation.sampler import check_sampling, precision_dtype, sample
from jetfast.models.gpt import load_gpt
from jetfast.models.vae import DECODE_MODES, load_vae
from jetfast.ops import dequantize
from jetfast.run import RunDir, check_output_file

CHUNK_JETS = 32  # HDF5 chunk along N, as the input files
DECODE_BATCH = 500  # jets decoded at once: ~1 GB of decoder output
KEYS = (IMAGE_KEY, *SCALAR_KEYS)  # every output; pt_gen and m0_gen when they were requested
KINEMATICS_MEANING = ("pt, m0: the jet pT and mass computed from the generated image (GeV); pt_gen, m0_gen "
                      "(when present): the generator-level pT and mass the jet was made for, asked or drawn from the training jets (GeV)")


@dataclass
class StageTimes:
    """Wall time spent in each stage, for the progress bar and the benchmark (a block is written
    while the next one is sampled: the write's time overlaps the others')."""

    seconds: dict = field(default_factory=lambda: {"sample": 0.0, "decode": 0.0, "write": 0.0})

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds

    def shares(self) -> dict:
        total = sum(self.seconds.values()) or 1.0
        return {stage: value / total for stage, value in self.seconds.items()}


class JetGenerator:
    """The trained pipeline of one run directory, loaded once.

    ``run_dir`` is a ``jetfast train-vae`` run with ``bins.npz`` (from ``jetfast
    fit-bins``) and a Transformer in ``run_dir/gpt`` (from ``jetfast train-gpt``),
    unless ``gpt_dir`` says otherwise.
    """

    def __init__(self, run_dir, gpt_dir=None, device=None, gpt=None):
        run = RunDir(run_dir)
        self.run_dir = run.path
        if not run.path.is_dir():
            raise FileNotFoundError(f"run directory not found: {run.path}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.vae, self.transform, self.vae_config = load_vae(run.path, map_location=self.device)
        if not run.bins_path.is_file():
            raise FileNotFoundError(f"{run.bins_path} not found: fit the latent bins first with `jetfast fit-bins {run.path} --data FILE`")
        centers, _ = load_bins(run.bins_path)
        self.centers = torch.from_numpy(centers).to(self.device)
        gpt_dir = Path(gpt_dir) if gpt_dir is not None else run.gpt.path
        # ``gpt``: a Transformer in memory (one being trained) in place of gpt_dir's.
        self.gpt, self.gpt_config = load_gpt(gpt_dir, map_location=self.device) if gpt is None else (gpt, gpt.config)
        self.gpt.to(self.device)
        latent_dim = self.centers.shape[0]
        if self.gpt_config.seq_len != latent_dim or self.gpt_config.vocab_size != self.centers.shape[1]:
            raise RunDirError(
                f"the Transformer in {gpt_dir} models {self.gpt_config.seq_len} codes of {self.gpt_config.vocab_size} bins, "
                f"but {run.bins_path} has {latent_dim} dimensions x {self.centers.shape[1]} bins: retrain it on this run's codes"
            )
        self.conditioned = self.vae_config.conditioned
        if self.conditioned and self.vae.training_jets is None:
            raise RunDirError(f"the VAE of {run.path} is conditioned on the jets but its checkpoint has no training jets "
                              "to draw them from; retrain it with this version of jetfast")

    @property
    def ranges(self):
        """The (pT, mass) ranges of the VAE's training jets, or None for a VAE not conditioned on them."""
        return training_ranges(self.vae.training_jets) if self.conditioned else None

    def complete(self, labels: torch.Tensor, pt, mass, seed: int):
        """(labels, pt, mass) of whole jets for a conditioned VAE (:func:`~jetfast.generation.conditions.complete`);
        the request as it is for one that is not."""
        return complete(self.vae.training_jets, labels, pt, mass, seed) if self.conditioned else (labels, pt, mass)

    @torch.inference_mode()
    def jets(self, labels: torch.Tensor, seed: int, times: StageTimes | None = None, decode: str = "sample",
             pt=None, mass=None, precision: str = "fp32", **sampling) -> np.ndarray:
        """Images (n, 125, 125, 3) float32 in GeV for per-jet class labels (-1 = unconditional) and,
        optionally, requested pT and mass (GeV, per jet; a VAE conditioned on the jets needs whole
        jets: see :meth:`complete`); jet i depends on (seed, i) only, its codes and its pixels alike."""
        times = times or StageTimes()
        start = time.perf_counter()
        kinematic = self.gpt_config.kinematic
        codes = sample(self.gpt, len(labels), cls=labels, pt=pt if kinematic else None, mass=mass if kinematic else None,
                       seed=seed, batch_size=max(1, len(labels)), device=self.device, precision=precision, **sampling)
        times.add("sample", time.perf_counter() - start)
        start = time.perf_counter()
        latents = dequantize(codes.to(self.device), self.centers)
        conditions = None
        if self.conditioned:
            if pt is None or mass is None or bool((labels < 0).any()):
                raise InvalidArgument("a VAE conditioned on the jets decodes whole jets: complete the request first "
                                      "(JetGenerator.complete)")
            conditions = torch.from_numpy(np.stack([labels.numpy(), pt, mass], axis=1).astype(np.float32)).to(self.device)
        # Decoded a slice at a time: a decoder output of 10,000 jets would take ~20 GB. Jet i is drawn
        # from the stream of (seed, i) whatever the slice, so the jets are the same.
        images = np.empty((len(latents), IMAGE_SIZE, IMAGE_SIZE, len(CHANNELS)), np.float32)
        for first in range(0, len(latents), DECODE_BATCH):
            rows = slice(first, first + DECODE_BATCH)
            images[rows] = self.vae.images(latents[rows], self.transform, None if conditions is None else conditions[rows],
                                           mode=decode, seed=seed, start=first, precision=precision).float().cpu().numpy()
        times.add("decode", time.perf_counter() - start)
        return images


def block_seed(seed: int, rank: int, block: int) -> int:
    """A 63-bit seed for one block that depends only on (seed, rank, block)."""
    digest = hashlib.blake2b(f"jetfast-generate:{seed}:{rank}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def shard_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.stem}.rank{rank}-of-{world}{out.suffix}")


def _settings(run_dir, n, conditions: Conditions, batch_size, seed, rank, world, decode, precision, sampling) -> dict:
    like = conditions.like
    return {
        "decode": decode,
        "precision": precision,
        "run_dir": str(Path(run_dir).resolve()),
        "n": int(n),
        "cls": conditions.cls,
        "pt": conditions.pt,
        "mass": conditions.mass,
        "like": None if like is None else {"path": os.path.abspath(like.path), "jets": len(like.rows),
                                           "rows_hash": hashlib.blake2b(like.rows.tobytes(), digest_size=8).hexdigest(),
                                           "offset": conditions.like_offset},
        "allow_extrapolation": conditions.allow_extrapolation,
        "batch_size": int(batch_size),
        "seed": int(seed),
        "rank": int(rank),
        "world_size": int(world),
        "sampling": {"temperature": 1.0, "top_k": None, "top_p": None, **sampling},
    }


def _create_partial(path: Path, n: int, settings: dict, requested: tuple[str, ...]):
    f = h5py.File(path, "w", libver="latest")
    f.create_dataset(
        "X_jets", shape=(n, IMAGE_SIZE, IMAGE_SIZE, len(CHANNELS)), dtype=np.float32,
        chunks=(min(CHUNK_JETS, max(n, 1)), IMAGE_SIZE, IMAGE_SIZE, len(CHANNELS)), compression="lzf",
    )
    for key in (*KEYS[1:], *requested):
        f.create_dataset(key, shape=(n,), dtype=np.float32)
    f.create_dataset("blocks_done", data=np.zeros(1, np.int64))
    f.attrs["jetfast_generate"] = json.dumps(settings, sort_keys=True)
    f.swmr_mode = True  # from here on a killed writer leaves a readable file
    return f


def _open_partial(path: Path, settings: dict, requested: tuple[str, ...]):
    """Reopen a partial output to continue it.

    A writer that was killed leaves the SWMR "open for writing" mark in the file, so
    HDF5 refuses to open it for writing again; it still reads consistently, so the
    finished blocks are copied into a fresh partial file, which replaces the old one.
    """
    try:
        f = h5py.File(path, "r+", libver="latest")
    except OSError:
        f = None
    if f is not None:
        _check_settings(f, path, settings)
        f.swmr_mode = True
        return f
    try:
        old = h5py.File(path, "r", libver="latest", swmr=True)
    except OSError as exc:
        raise GenerationMismatch(f"{path} cannot be read to resume ({exc}); delete it to start again") from exc
    recovered = path.with_name(path.name + ".recover")
    with old:
        _check_settings(old, path, settings)
        done = int(old["blocks_done"][0])
        jets = min(done * settings["batch_size"], settings["n"])
        new = _create_partial(recovered, settings["n"], settings, requested)
        with new:
            for start in range(0, jets, 1024):
                stop = min(jets, start + 1024)
                for key in (*KEYS, *requested):
                    new[key][start:stop] = old[key][start:stop]
            new.flush()
            new["blocks_done"][0] = done
    os.replace(recovered, path)
    f = h5py.File(path, "r+", libver="latest")
    f.swmr_mode = True
    return f


def _check_settings(f, path: Path, settings: dict) -> None:
    written = json.loads(f.attrs.get("jetfast_generate", "{}"))
    if written != json.loads(json.dumps(settings, sort_keys=True)):
        f.close()
        raise GenerationMismatch(
            f"{path} was written with other settings; resume with the same arguments or delete it.\n"
            f"  in the file: {written}\n  requested:   {settings}"
        )


def _finish(partial: Path, final: Path) -> None:
    with h5py.File(partial, "r+") as f:
        settings = json.loads(f.attrs["jetfast_generate"])
        del f["blocks_done"]
        f.attrs["generator"] = "jetfast generate"
        f.attrs["label_meaning"] = "y = 1 quark, 0 gluon, -1 unconditional"
        f.attrs["kinematics_meaning"] = KINEMATICS_MEANING
        f.attrs["settings"] = json.dumps(settings, sort_keys=True)
        f.attrs["jetfast_version"] = jetfast.__version__
    os.replace(partial, final)


def generate_file(
    run_dir,
    n: int,
    out,
    *,
    cls: str | None = None,
    pt=None,
    mass=None,
    like=None,
    like_rows=None,
    like_offset: int = 0,
    allow_extrapolation: bool = False,
    batch_size: int = 256,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    decode: str = "sample",
    precision: str = "fp32",
    gpt_dir=None,
    device=None,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    generator: JetGenerator | None = None,
    times: StageTimes | None = None,
    **sampling,
) -> Path:
    """Generate ``n`` jets into ``out`` (this rank's share when ``world_size`` > 1).

    What the jets are asked to be (:mod:`jetfast.generation.conditions`): ``cls`` (quark, gluon,
    mix, unconditional; default: the --like jets' class, else mix), ``pt`` and ``mass`` (GeV, a
    value or a ``(lo, hi)`` range), or ``like``, a jet file whose jets (``like_rows`` of it, from
    ``like_offset`` on) are mirrored one to one. Returns the path written. See the module
    docstring for resuming and sharding.
    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise InvalidArgument(f"n must be a positive number of jets; got {n!r}")
    if cls is not None and cls not in CLASS_CHOICES:
        raise InvalidArgument(f"cls must be one of {CLASS_CHOICES}; got {cls!r}")
    if batch_size < 1:
        raise InvalidArgument(f"batch_size must be positive; got {batch_size}")
    if decode not in DECODE_MODES:
        raise InvalidArgument(f"decode must be one of {DECODE_MODES}; got {decode!r}")
    precision_dtype(precision)  # the sampler's precisions, which the decoder shares
    n, out = int(n), check_output_file(out, overwrite)
    conditions = Conditions(cls=cls, pt=pt, mass=mass, like=None if like is None else LikeJets.read(like, like_rows),
                            like_offset=like_offset, allow_extrapolation=allow_extrapolation)
    partial = out.with_name(out.name + ".partial")
    settings = _settings(run_dir, n, conditions, batch_size, seed, rank, world_size, decode, precision, sampling)
    if partial.exists() and not resume:
        raise FileExistsError(
            f"{partial} is left from an interrupted run: pass resume=True (--resume) to continue it, or delete it"
        )
    generator = generator or JetGenerator(run_dir, gpt_dir=gpt_dir, device=device)
    # Everything is checked before the partial file exists.
    check_sampling(generator.gpt_config.vocab_size, **sampling)
    conditions.check(n, generator.gpt, generator.ranges)
    times = times or StageTimes()
    requested = conditions.written_for(generator.conditioned)
    f = (_open_partial(partial, settings, requested) if partial.exists()
         else _create_partial(partial, n, settings, requested))
    num_blocks = (n + batch_size - 1) // batch_size
    try:
        done = int(f["blocks_done"][0])
        first_jet = min(done * batch_size, n)
        bar = tqdm(total=n, initial=first_jet, unit="jet", desc=f"generating {out.name}", disable=not progress, smoothing=0.1)

        def finished(block_written) -> None:
            bar.update(block_written.result())  # a failed write raises here
            bar.set_postfix({stage: f"{share:.0%}" for stage, share in times.shares().items()})

        # Block b is written by one thread while the next block is sampled (h5py releases the
        # GIL in HDF5's reads and writes): at most one block waits to be written.
        with ThreadPoolExecutor(1, thread_name_prefix="jetfast-write") as writer:
            pending = None
            for block in range(done, num_blocks):
                start, stop = block * batch_size, min(n, (block + 1) * batch_size)
                seed_b = block_seed(seed, rank, block)
                labels, pt_gen, m0_gen = generator.complete(*conditions.block(start, stop, seed_b), seed_b)
                images = generator.jets(labels, seed_b, times, decode=decode, pt=pt_gen, mass=m0_gen, precision=precision,
                                        allow_extrapolation=True, **sampling)  # checked above
                if pending is not None:
                    finished(pending)
                pending = writer.submit(_write_block, f, block, start, images, labels, pt_gen, m0_gen, times)
            if pending is not None:
                finished(pending)
        bar.close()
    finally:
        f.close()
    _finish(partial, out)
    return out


def _write_block(f, block: int, start: int, images: np.ndarray, labels: torch.Tensor, pt_gen, m0_gen,
                 times: StageTimes) -> int:
    """Write one block's jets at rows [start, start + len(images)) and then, once they are on
    disk, advance the file's progress counter; return the number of jets."""
    tick = time.perf_counter()
    stop = start + len(images)
    image_pt, image_mass = jet_pt_mass(images)
    f["X_jets"][start:stop] = images
    f["y"][start:stop] = labels.numpy().astype(np.float32)
    f["pt"][start:stop] = image_pt
    f["m0"][start:stop] = image_mass
    for key, values in zip(REQUESTED_KEYS, (pt_gen, m0_gen)):
        if values is not None:
            f[key][start:stop] = values
    f.flush()
    f["blocks_done"][0] = block + 1  # only after the block is on disk
    f.flush()
    times.add("write", time.perf_counter() - tick)
    return len(images)


def write_virtual_dataset(out: Path, shards: list[Path]) -> Path:
    """Write ``out`` as an HDF5 virtual dataset concatenating the shards along N."""
    sizes, shapes = [], {}
    for shard in shards:
        with h5py.File(shard, "r") as f:
            sizes.append(f["X_jets"].shape[0])
            for key in (*KEYS, *REQUESTED_KEYS):
                if key in f:
                    shapes[key] = (f[key].shape[1:], f[key].dtype)
    total = sum(sizes)
    tmp = out.with_name(out.name + ".tmp")
    with h5py.File(tmp, "w", libver="latest") as f:
        for key, (tail, dtype) in shapes.items():
            layout = h5py.VirtualLayout(shape=(total, *tail), dtype=dtype)
            offset = 0
            for shard, size in zip(shards, sizes):
                # Relative names: HDF5 resolves them beside the virtual file, so the set can move together.
                layout[offset : offset + size] = h5py.VirtualSource(os.path.relpath(shard, out.parent), key, shape=(size, *tail))
                offset += size
            f.create_virtual_dataset(key, layout, fillvalue=0)
        f.attrs["generator"] = "jetfast generate (virtual dataset over rank shards)"
        f.attrs["shards"] = json.dumps([shard.name for shard in shards])
    os.replace(tmp, out)
    return out


def generate(run_dir, n: int, out, **kwargs) -> Path:
    """Generate ``n`` jets into ``out``; under torchrun, shards per rank plus a virtual dataset.

    ``kwargs`` are those of :func:`generate_file` (``cls``, ``pt``, ``mass``, ``like``, ``like_rows``,
    ``allow_extrapolation``, ``batch_size``, ``seed``, ``resume``, ``overwrite``, ``decode``,
    ``gpt_dir``, ``device``, ``progress``, ``times``) and the sampling options of
    :func:`jetfast.sample` (``temperature``, ``top_k``, ``top_p``).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return generate_file(run_dir, n, out, **kwargs)
    rank, world, _, device = distributed.setup_distributed()
    out = check_output_file(out, kwargs.get("overwrite", False))
    shares = [n // world + (1 if r < n % world else 0) for r in range(world)]
    share = shares[rank]
    kwargs["like_offset"] = sum(shares[:rank])  # each rank mirrors its own run of the --like jets
    if device.type == "cuda":
        kwargs.setdefault("device", str(device))
    shards = [shard_path(out, r, world) for r in range(world)]
    try:
        generate_file(run_dir, share, shards[rank], rank=rank, world_size=world, progress=kwargs.pop("progress", True) and rank == 0, **kwargs)
        distributed.barrier()
        if rank == 0:
            write_virtual_dataset(out, shards)
        distributed.barrier()
    finally:
        distributed.cleanup()
    return out
