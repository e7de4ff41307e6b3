"""What every jetfast trainer shares: the run directory, the data split, seeding,
distributed set-up, a divergence guard, early stopping and loss plots.

A run directory explains itself::

    RUN_DIR/
      config.json          every option of the run, the data file, N, the intensity transform
      split.npz            train/val/test jet indices into the data file (test is never trained on)
      metrics.jsonl        one JSON object per epoch (losses, lr, time, images/s)
      checkpoints/last.pt  state at the end of the latest epoch (model, optimizer, RNG, ...)
      checkpoints/best.pt  state at the best validation loss
      plots/loss.png       loss curves drawn from metrics.jsonl
      README.txt           this description

Every file is written atomically (``*.tmp`` then ``os.replace``) so that a crash or a
``Ctrl-C`` never leaves a half-written checkpoint where a good one was.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

README_TEXT = """\
This directory is a jetfast training run.

  config.json          every option of the run, the data file and its N, the intensity transform
  split.npz            arrays train/val/test: jet indices into the data file; test jets are
                       never used for training or model selection
  metrics.jsonl        one JSON object per epoch (train_*/val_* losses, lr, time_s, images_per_s)
  checkpoints/last.pt  state at the end of the latest epoch: model, optimizer, scheduler, RNG, epoch, step
  checkpoints/best.pt  the same at the best validation loss
  plots/loss.png       loss curves drawn from metrics.jsonl
  eval/                written by the evaluate commands, if run

Load a checkpoint with torch.load(path, weights_only=False) or jetfast.train.common.load_checkpoint.
"""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


class RunDirExists(FileExistsError):
    """``--out`` names a non-empty directory and neither resume nor overwrite was asked for."""


# -- atomic files ------------------------------------------------------------------------------
def _atomic_replace(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj) -> None:
    """Pretty JSON, written atomically."""
    _atomic_replace(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"))


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.ndarray,)):
        return obj.tolist()
    if isinstance(obj, (Path,)):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically."""
    _atomic_replace(Path(path), lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`, with an error that says what is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # Checkpoints hold plain Python objects (configs, RNG states) besides tensors.
    return torch.load(path, map_location=map_location, weights_only=False)


# -- the run directory -------------------------------------------------------------------------
class RunDir:
    """A training run's directory; see the module docstring for its layout."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def split_path(self) -> Path:
        return self.path / "split.npz"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def checkpoint(self, which: str = "last") -> Path:
        return self.checkpoints / f"{which}.pt"

    @classmethod
    def prepare(cls, path: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> "RunDir":
        """Create (or reopen, for ``resume``) a run directory.

        A non-empty directory without ``resume`` or ``overwrite`` is an error rather than
        silently mixing two runs' metrics; ``overwrite`` deletes only the files a run writes.
        """
        run = cls(path)
        if resume:
            if not run.checkpoint("last").is_file():
                raise FileNotFoundError(f"cannot resume: {run.checkpoint('last')} does not exist (start without --resume)")
            return run
        if run.path.exists() and not run.path.is_dir():
            raise RunDirExists(f"{run.path} exists and is not a directory")
        if run.path.is_dir() and any(run.path.iterdir()):
            if not overwrite:
                raise RunDirExists(
                    f"{run.path} already exists and is not empty; pass --resume to continue that run "
                    "or --overwrite to replace it (or choose another --out)"
                )
            run._remove_run_files()
        run.path.mkdir(parents=True, exist_ok=True)
        (run.path / "README.txt").write_text(README_TEXT)
        return run

    def _remove_run_files(self) -> None:
        import shutil

        for name in ("config.json", "metrics.jsonl", "split.npz", "README.txt"):
            (self.path / name).unlink(missing_ok=True)
        for sub in ("checkpoints", "plots", "eval"):
            shutil.rmtree(self.path / sub, ignore_errors=True)

    def write_config(self, config: dict) -> None:
        write_json(self.config_path, config)

    def read_config(self) -> dict:
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.config_path} not found: is {self.path} a jetfast run directory?")
        return json.loads(self.config_path.read_text())

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
        _atomic_replace(self.metrics_path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept)))

    def save_checkpoint(self, state: dict, which: str = "last") -> Path:
        path = self.checkpoint(which)
        save_checkpoint(state, path)
        return path

    def load_checkpoint(self, which: str = "last", map_location="cpu") -> dict:
        return load_checkpoint(self.checkpoint(which), map_location)

    def end_epoch(self, state: dict, record: dict, improved: bool, plot_keys: tuple[str, ...] | None = None) -> None:
        """Checkpoint ``last`` (and ``best`` when the epoch improved), log the metrics
        line, redraw the loss plot: what every trainer does after an epoch."""
        self.save_checkpoint(state, "last")
        if improved:
            self.save_checkpoint(state, "best")
        self.log_metrics(record)
        self.plot_losses(keys=plot_keys)

    def plot_losses(self, keys: tuple[str, ...] | None = None) -> Path:
        return plot_losses(self.metrics_path, self.plots / "loss.png", keys)


# -- the data split ----------------------------------------------------------------------------
def make_split(n: int, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> dict[str, np.ndarray]:
    """Shuffle ``range(n)`` with ``seed`` and cut it into sorted train/val/test index arrays.

    Sorted indices keep HDF5 reads in file order within each split. Each part gets at least
    one jet when ``n >= 3`` so that tiny files still have a validation and a test set.
    """
    n = int(n)
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1; got {fractions}")
    if n < 3:
        raise ValueError(f"need at least 3 jets to split into train/val/test; got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(fractions[1] * n))) if fractions[1] > 0 else 0
    n_test = max(1, int(round(fractions[2] * n))) if fractions[2] > 0 else 0
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{n} jets leave no training jets with fractions {fractions}")
    parts = np.split(order, [n_train, n_train + n_val])
    return {name: np.sort(part).astype(np.int64) for name, part in zip(("train", "val", "test"), parts)}


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


# -- seeding and RNG state ---------------------------------------------------------------------
def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` ask torch for deterministic kernels.

    ``warn_only`` keeps ops without a deterministic implementation usable (with a warning)
    instead of failing a long run.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def rng_state() -> dict:
    """Every RNG a training step may draw from, for the checkpoint."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- distributed -------------------------------------------------------------------------------
def setup_distributed() -> tuple[int, int, int, torch.device]:
    """Return ``(rank, world_size, local_rank, device)``; initialise torch.distributed under torchrun.

    A plain ``python`` start (``WORLD_SIZE`` unset or 1) is a single process on CUDA when
    available, else the CPU. Under torchrun the backend is NCCL on GPUs and gloo on CPUs.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return rank, world_size, local_rank, device


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """True on rank 0 (or when not distributed): the process that writes files and prints."""
    if is_distributed():
        import torch.distributed as dist

        return dist.get_rank() == 0
    return True


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (identity when not distributed)."""
    if is_distributed():
        import torch.distributed as dist

        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def cleanup() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.destroy_process_group()


# -- guards and schedules ----------------------------------------------------------------------
def check_finite(loss: torch.Tensor | float, step: int, epoch: int | None = None, what: str = "loss") -> None:
    """Raise :class:`TrainingDiverged` naming the step when ``loss`` is NaN or infinite."""
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    if not math.isfinite(value):
        where = f"step {step}" + (f" (epoch {epoch})" if epoch is not None else "")
        raise TrainingDiverged(
            f"training diverged: {what} is {value} at {where}; the last good checkpoint was kept. "
            "Try a lower --lr, a smaller --beta or a longer KL warm-up."
        )


@dataclass
class EarlyStopping:
    """Stop when the monitored value (lower is better) has not improved by ``min_delta`` for ``patience`` epochs."""

    patience: int = 10
    min_delta: float = 0.0
    best: float = math.inf
    bad_epochs: int = 0
    best_epoch: int = -1
    history: list = field(default_factory=list)

    def step(self, value: float, epoch: int | None = None) -> bool:
        """Record ``value``; return True when it is a new best."""
        self.history.append(float(value))
        if value < self.best - self.min_delta:
            self.best, self.bad_epochs = float(value), 0
            self.best_epoch = len(self.history) - 1 if epoch is None else epoch
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"patience": self.patience, "min_delta": self.min_delta, "best": self.best,
                "bad_epochs": self.bad_epochs, "best_epoch": self.best_epoch, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


# -- plots -------------------------------------------------------------------------------------
def plot_losses(metrics_path: str | os.PathLike, out_png: str | os.PathLike, keys: tuple[str, ...] | None = None) -> Path:
    """Draw per-epoch curves from ``metrics.jsonl``.

    ``keys`` defaults to every ``train_*``/``val_*`` number; each train/val pair shares a
    panel (log y-axis when all values are positive).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if keys is None:
        keys = tuple(dict.fromkeys(k for r in records for k in r if k.startswith(("train_", "val_"))))
    quantities = list(dict.fromkeys(k.split("_", 1)[1] for k in keys))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, max(1, len(quantities)), figsize=(4.2 * max(1, len(quantities)), 3.4), squeeze=False)
    for ax, quantity in zip(axes[0], quantities):
        positive = True
        for prefix, style in (("train", "-"), ("val", "--")):
            key = f"{prefix}_{quantity}"
            if key not in keys:
                continue
            points = [(r.get("epoch", i), r[key]) for i, r in enumerate(records) if isinstance(r.get(key), (int, float))]
            if points:
                xs, ys = zip(*points)
                positive &= min(ys) > 0
                ax.plot(xs, ys, style, marker="o", ms=3, label=prefix)
        ax.set_title(quantity)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if positive:
            ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _atomic_replace(out_png, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out_png


# ---------------------------------------------------------------------------------------
# Command-line plumbing shared by the trainers
# ---------------------------------------------------------------------------------------
def add_execution_arguments(parser, seed_help: str):
    """The options every trainer has: seed, torch threads, progress bar."""
    group = parser.add_argument_group("execution")
    group.add_argument("--seed", type=int, default=0, help=seed_help)
    group.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    return group


def run_trainer(command: str, train, args, user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run ``train(args)``: errors the user can fix print one line and exit 2; the
    process group is torn down whatever happens."""
    import sys

    try:
        train(args)
    except (FileNotFoundError, RunDirExists, TrainingDiverged, ValueError, *user_errors) as exc:
        print(f"jetfast {command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    return 0
