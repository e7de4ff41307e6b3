"""What both trainers share besides the run directory (:mod:`jetfast.run`) and torchrun
(:mod:`jetfast.distributed`): seeding and RNG state, a divergence guard, early stopping,
the end of an epoch and the loss plot.
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

from jetfast.errors import TrainingDiverged
from jetfast.run import RunDir, atomic_write


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


def end_epoch(run: RunDir, state: dict, record: dict, improved: bool, plot_keys: tuple[str, ...] | None = None) -> None:
    """Checkpoint ``last`` (and ``best`` when the epoch improved), log the metrics line,
    redraw the loss plot: what every trainer does after an epoch."""
    run.save_checkpoint(state, "last")
    if improved:
        run.save_checkpoint(state, "best")
    run.log_metrics(record)
    plot_losses(run.metrics_path, run.loss_plot, plot_keys)


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
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
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

    from jetfast.distributed import cleanup
    from jetfast.errors import RunDirExists

    try:
        train(args)
    except (FileNotFoundError, RunDirExists, TrainingDiverged, ValueError, *user_errors) as exc:
        print(f"jetfast {command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    return 0
