"""The run directory: where every stage reads and writes, in one place.

``jetfast train-vae --out RUN_DIR`` creates it; the later stages add to it::

    RUN_DIR/
      README.txt            what the files are (written by train-vae)
      config.json           every option of the run, the data file and N, the VAE config, the transform
      split.npz             train/val/test jet indices into the data file (test is never trained on)
      metrics.jsonl         one JSON object per epoch (losses, lr, time, images/s)
      checkpoints/last.pt   state at the end of the latest epoch (model, optimizer, scheduler, RNG, ...)
      checkpoints/best.pt   the same at the best validation loss
      plots/loss.png        loss curves drawn from metrics.jsonl
      eval/                 jetfast evaluate-vae (and jetfast evaluate --run: eval/<generated file>/)
      bins.npz              jetfast fit-bins: the latent bin centers (format: jetfast.bins.save_bins)
      bins_report.json      jetfast fit-bins: the fit and what quantizing costs
      codes.h5              jetfast encode: the codes of every jet (format: jetfast.latent.codes)
      encode_report.json    jetfast encode: what quantizing costs, over every jet
      gpt/                  jetfast train-gpt: a training run of the same layout (no split.npz)

Every file is written atomically (``*.tmp`` then ``os.replace``) so that a crash or a
``Ctrl-C`` never leaves a half-written checkpoint where a good one was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from jetfast.errors import InvalidArgument, RunDirError, RunDirExists

VAE_README = """\
This directory is a jetfast training run.

  config.json          every option of the run, the data file and its N, the intensity transform
  split.npz            arrays train/val/test: jet indices into the data file; test jets are
                       never used for training or model selection
  metrics.jsonl        one JSON object per epoch (train_*/val_* losses, lr, time_s, images_per_s)
  checkpoints/last.pt  state at the end of the latest epoch: model, optimizer, scheduler, RNG, epoch, step
  checkpoints/best.pt  the same at the best validation loss
  plots/loss.png       loss curves drawn from metrics.jsonl
  eval/                written by the evaluate commands, if run

Load a checkpoint with torch.load(path, weights_only=False) or jetfast.run.load_checkpoint.
"""

GPT_README = """\
This directory is a jetfast code-Transformer (stage 2) training run.

  config.json          every option of the run, the codes file, its sizes, the model config
  metrics.jsonl        one JSON object per epoch: train_loss / val_loss (nats per code),
                       val_bpd (bits per latent dimension, class-conditional), val_bpd_uncond
                       (unconditional start token), marginal_val_bpd (the same for the per-dimension
                       histograms of the training codes: the baseline), lr, step, time_s, codes_per_s
  checkpoints/last.pt  state at the end of the latest epoch: config, model, optimizer, scheduler, RNG, epoch, step
  checkpoints/best.pt  the same at the lowest validation loss
  plots/loss.png       loss curves drawn from metrics.jsonl

Load the model with jetfast.models.gpt.load_gpt(this_directory) and sample with jetfast.sample.
"""

CHECKPOINTS = ("best", "last")


# -- atomic files ------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, data) -> Path:
    """Write ``data`` (str, bytes, or a function that writes to the path it is given) to
    ``path.tmp``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if callable(data):
        data(tmp)
    else:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path


def check_output_file(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse, before any work is done, an output file that could not be written at the end:
    a directory, an existing file (unless ``overwrite``), a missing or unwritable directory."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name such as {path / 'jets.h5'}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or pass overwrite=True (--overwrite)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"directory {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to directory {path.parent}; choose a writable location")
    return path


def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_json(path: str | os.PathLike, obj) -> Path:
    """Pretty JSON (NumPy numbers and arrays, paths and tuples converted), written atomically."""
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`, with an error that says what is missing."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # Checkpoints hold plain Python objects (configs, RNG states) besides tensors.
    return torch.load(path, map_location=map_location, weights_only=False)


def checkpoint_file(run_dir_or_checkpoint: str | os.PathLike, which: str = "best", command: str = "train-vae") -> Path:
    """The checkpoint ``which`` of a run directory, or the checkpoint file given."""
    path = Path(run_dir_or_checkpoint)
    if path.is_dir():
        candidate = RunDir(path).checkpoint(which)
        if which not in CHECKPOINTS or not candidate.is_file():
            raise FileNotFoundError(
                f"{candidate} not found; {path} should be a `jetfast {command}` run directory "
                f"(which must be 'best' or 'last'; got {which!r})"
            )
        return candidate
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (train one with `jetfast {command}`)")
    return path


# -- the run directory -------------------------------------------------------------------------
class _Entry:
    """A file or directory of the layout, as a path inside a :class:`RunDir`."""

    def __init__(self, *parts: str):
        self.parts = parts

    def __get__(self, run: "RunDir | None", owner=None):
        return self if run is None else run.path.joinpath(*self.parts)


class RunDir:
    """A run directory; see the module docstring for its layout."""

    # Files of every training run (the VAE run, and the Transformer run in gpt/).
    readme_path = _Entry("README.txt")
    config_path = _Entry("config.json")
    metrics_path = _Entry("metrics.jsonl")
    checkpoints = _Entry("checkpoints")
    plots = _Entry("plots")
    loss_plot = _Entry("plots", "loss.png")
    # Files of a VAE run and of the stages after it.
    split_path = _Entry("split.npz")
    eval_dir = _Entry("eval")
    bins_path = _Entry("bins.npz")
    bins_report_path = _Entry("bins_report.json")
    codes_path = _Entry("codes.h5")
    encode_report_path = _Entry("encode_report.json")

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def checkpoint(self, which: str = "last") -> Path:
        return self.checkpoints / f"{which}.pt"

    @property
    def gpt(self) -> "RunDir":
        """The Transformer's run directory."""
        return RunDir(self.path / "gpt")

    @classmethod
    def prepare(cls, path: str | os.PathLike, resume: bool = False, overwrite: bool = False,
                readme: str = VAE_README) -> "RunDir":
        """Create (or reopen, for ``resume``) a training run's directory.

        A non-empty directory without ``resume`` or ``overwrite`` is an error rather than
        silently mixing two runs' metrics, unless it holds a run that never checkpointed
        (:meth:`never_checkpointed`), which is started again; ``overwrite`` deletes only the
        files a run writes.
        """
        run = cls(path)
        if resume:
            if not run.checkpoint("last").is_file():
                raise FileNotFoundError(f"cannot resume: {run.checkpoint('last')} does not exist (start without --resume)")
            return run
        if run.path.exists() and not run.path.is_dir():
            raise RunDirExists(f"{run.path} exists and is not a directory")
        if run.path.is_dir() and any(run.path.iterdir()):
            if not overwrite and not run.never_checkpointed():
                raise RunDirExists(
                    f"{run.path} already exists and is not empty; pass --resume to continue that run "
                    "or --overwrite to replace it (or choose another --out)"
                )
            run._remove_run_files()
        run.path.mkdir(parents=True, exist_ok=True)
        run.readme_path.write_text(readme)
        return run

    def never_checkpointed(self) -> bool:
        """Whether this is a training run (its README.txt says so) that failed or was stopped
        before its first checkpoint: nothing in it can be resumed or is worth keeping."""
        try:
            ours = self.readme_path.read_text().startswith("This directory is a jetfast")
        except OSError:
            return False
        return ours and not self.checkpoint("last").is_file()

    def _remove_run_files(self) -> None:
        for path in (self.config_path, self.metrics_path, self.split_path, self.readme_path):
            path.unlink(missing_ok=True)
        for directory in (self.checkpoints, self.plots, self.eval_dir):
            shutil.rmtree(directory, ignore_errors=True)

    def write_config(self, config: dict) -> None:
        write_json(self.config_path, config)

    def read_config(self) -> dict:
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.config_path} not found: is {self.path} a jetfast run directory?")
        return json.loads(self.config_path.read_text())

    def data_file(self, data: str | os.PathLike | None = None, option: str = "--data") -> str:
        """The jet file of this run: ``data`` when given, else the one its config.json names."""
        if data:
            return os.fspath(data)
        data = self.read_config().get("data")
        if not data:
            raise RunDirError(f"{self.config_path} names no jet file; pass {option}")
        return data

    def log_metrics(self, record: dict) -> None:
        """Append one JSON line and flush it, so ``tail -f metrics.jsonl`` follows training."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, after_epoch: int) -> None:
        """Drop metric lines past ``after_epoch`` (a resumed run repeats epochs never checkpointed)."""
        kept = [r for r in self.read_metrics() if r.get("epoch", -1) <= after_epoch]
        atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def save_checkpoint(self, state: dict, which: str = "last") -> Path:
        return save_checkpoint(state, self.checkpoint(which))

    def load_checkpoint(self, which: str = "last", map_location="cpu") -> dict:
        return load_checkpoint(self.checkpoint(which), map_location)


# -- the data split ----------------------------------------------------------------------------
SPLITS = ("train", "val", "test")


def make_split(n: int, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> dict[str, np.ndarray]:
    """Shuffle ``range(n)`` with ``seed`` and cut it into sorted train/val/test index arrays.

    Sorted indices keep HDF5 reads in file order within each split. Each part gets at least
    one jet when ``n >= 3`` so that tiny files still have a validation and a test set.
    """
    n = int(n)
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise InvalidArgument(f"split fractions must be three non-negative numbers summing to 1; got {fractions}")
    if n < 3:
        raise InvalidArgument(f"need at least 3 jets to split into train/val/test; got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(fractions[1] * n))) if fractions[1] > 0 else 0
    n_test = max(1, int(round(fractions[2] * n))) if fractions[2] > 0 else 0
    n_train = n - n_val - n_test
    if n_train < 1:
        raise InvalidArgument(f"{n} jets leave no training jets with fractions {fractions}")
    parts = np.split(order, [n_train, n_train + n_val])
    return {name: np.sort(part).astype(np.int64) for name, part in zip(SPLITS, parts)}


def save_split(run_dir: str | os.PathLike | RunDir, split: dict[str, np.ndarray]) -> Path:
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    # np.savez appends ".npz" to names without it, so the temporary file keeps that suffix.
    tmp = run.split_path.with_name("split.tmp.npz")
    run.path.mkdir(parents=True, exist_ok=True)
    np.savez(tmp, **{k: np.asarray(v, np.int64) for k, v in split.items()})
    os.replace(tmp, run.split_path)
    return run.split_path


def load_split(run_dir: str | os.PathLike | RunDir) -> dict[str, np.ndarray]:
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    if not run.split_path.is_file():
        raise FileNotFoundError(f"{run.split_path} not found: is {run.path} a jetfast run directory?")
    with np.load(run.split_path) as z:
        return {k: z[k].astype(np.int64) for k in z.files}


def check_split_fits(split: dict[str, np.ndarray], file_jets: int, data: str) -> None:
    """Refuse a jet file with fewer jets than the run's split indexes."""
    largest = max((int(v.max()) for v in split.values() if len(v)), default=-1)
    if largest >= file_jets:
        raise RunDirError(
            f"{data} has {file_jets} jets but the run's split goes up to jet {largest}: "
            "is this the file the run was trained on?"
        )
