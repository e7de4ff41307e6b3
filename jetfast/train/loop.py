"""The training loop both stages run: ``jetfast train-vae`` and ``jetfast train-gpt``.

A :class:`Stage` says what is trained: its data, model, optimizer and learning-rate
schedule, one training step (a dict of loss terms, ``"loss"`` the one minimized), the
validation sums, what its checkpoints hold besides the common state, and how its epochs
are reported. :func:`fit` does the rest the same way for every stage:

* the run directory (:mod:`jetfast.run`): created, or reopened with ``resume``; then the
  options a run may change (:data:`RUN_OPTIONS`: paths, length, threads, progress bar) come
  from the new call and every other option from the run's config.json;
* torchrun: DistributedDataParallel, rank 0 writing files, sums over all ranks;
* each step in the chosen precision (``precision``: bf16 autocast where the hardware has it,
  :func:`autocast_context`); a NaN/inf loss on any rank stops every rank at that step (``TrainingDiverged``,
  the last good checkpoint kept), then backward, gradient clipping (a non-finite norm
  stops too) and the optimizer step; a per-step schedule steps with it;
* each epoch: validation, a ``ReduceLROnPlateau`` schedule (if the stage has one) stepped on the validation loss,
  early stopping, ``checkpoints/last.pt`` (and ``best.pt``) holding model, optimizer,
  scheduler, early stopping, RNG states, epoch and step, one metrics line with every term
  the stage logs, and ``plots/loss.png``.

A run resumed with the same length continues exactly: the same losses and weights as an
uninterrupted run (a longer one may change a schedule that depends on the run's length).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from jetfast import distributed
from jetfast.errors import InvalidArgument, TrainingDiverged
from jetfast.run import VAE_README, RunDir, atomic_write

# Options a resumed run takes from the new call: where the run and its inputs are, how long
# to train and how to run. Every other option comes from the run's config.json, so the
# model, the data and the optimization stay the run's own.
RUN_OPTIONS = ("out", "resume", "overwrite", "data", "codes", "run_dir", "epochs", "max_steps", "no_progress",
               "num_threads", "loader_threads")


class Stage:
    """One training stage, as :func:`fit` sees it.

    ``options`` is the stage's options dataclass; :func:`fit` reads the options every stage
    has from it (``epochs``, ``batch_size``, ``lr``, ``grad_clip``, ``patience``, ``seed``,
    ``num_threads``, ``no_progress``, ``resume``, ``overwrite``). A stage sets ``out`` (its run
    directory) and, in :meth:`build`, ``steps_per_epoch`` and optionally ``total_steps`` (a cap
    on optimizer steps).
    """

    name = "train"  # the command, in messages
    readme = VAE_README  # README.txt of a fresh run directory
    throughput = ("items_per_s", 2)  # metric name and rounding of the training items per second
    plot_keys: tuple[str, ...] | None = None  # metrics drawn in plots/loss.png (None: every train_*/val_*)
    steps_per_epoch = 0
    total_steps: int | None = None

    def __init__(self, options):
        self.options = options
        self.out = options.out

    # -- the run ---------------------------------------------------------------------------
    def open(self) -> None:
        """Check the stage's options and read or check the input data, before the run directory
        is touched: a refused option or input leaves nothing behind."""

    def begin(self, run: RunDir, main: bool) -> None:
        """A fresh run: decide what is decided once (split, transform, model config)."""

    def resume(self, run: RunDir, state: dict, config: dict) -> None:
        """A resumed run: the same, from its last checkpoint and config.json."""

    def write_run_files(self, run: RunDir, world_size: int) -> None:
        """config.json (and any other file) of a fresh run; called on rank 0 only."""

    def build(self, rank: int, world_size: int, device: torch.device) -> torch.nn.Module:
        """This rank's data and the model (called after seeding); sets ``steps_per_epoch``."""
        raise NotImplementedError

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def build_scheduler(self, optimizer: torch.optim.Optimizer, step: int):
        """The learning-rate schedule at optimizer step ``step``: stepped after every optimizer
        step, or, a ``ReduceLROnPlateau``, after every epoch on the validation loss."""
        raise NotImplementedError

    def checkpoint_extras(self) -> dict:
        """What a checkpoint holds besides the common training state (configs, transforms)."""
        return {}

    # -- an epoch --------------------------------------------------------------------------
    def batches(self, epoch: int) -> Iterable:
        """This rank's training batches of ``epoch``."""
        raise NotImplementedError

    def step(self, net: torch.nn.Module, batch, step: int) -> tuple[dict[str, torch.Tensor], int]:
        """The forward pass of one training batch: its loss terms (scalars; ``"loss"`` is
        minimized) and the number of items they average over."""
        raise NotImplementedError

    def validate(self, model: torch.nn.Module) -> tuple[dict[str, float], int]:
        """Sums of the validation terms over this rank's validation items, and their number."""
        raise NotImplementedError

    def monitor(self, model: torch.nn.Module, val: dict[str, float]) -> float:
        """What the best checkpoint and early stopping follow (lower is better), after the epoch's
        validation: the validation loss."""
        return val["loss"]

    def record(self, train: dict[str, float], val: dict[str, float], step: int) -> dict:
        """The stage's part of the epoch's metrics line, from the mean terms of training and validation."""
        return {**{f"train_{k}": v for k, v in train.items()}, **{f"val_{k}": v for k, v in val.items()}}

    def progress(self, terms: dict[str, float]) -> dict:
        """What the progress bar shows after a step."""
        return {k: f"{v:.4g}" for k, v in terms.items()}

    def describe_start(self, run: RunDir, start_epoch: int, step: int, world_size: int) -> str:
        return f"run directory {run.path}"

    def describe_epoch(self, record: dict) -> str:
        return f"train {record['train_loss']:.5g}  val {record['val_loss']:.5g}  lr {record['lr']:.2g}"

    def close(self) -> None:
        """Release the data (loader threads)."""


def fit(stage: Stage) -> RunDir:
    """Train ``stage`` (fresh, or resumed from its last checkpoint); return the run directory.

    Every option is checked before the run directory is touched. A directory whose run stopped
    before its first checkpoint is started again, with or without ``resume``."""
    options = stage.options
    if options.epochs < 1 or options.batch_size < 1 or not 0 < options.lr < math.inf:
        raise InvalidArgument(f"need --epochs >= 1, --batch-size >= 1 and a finite --lr > 0; "
                              f"got {options.epochs}, {options.batch_size}, {options.lr}")
    if not (0 <= options.weight_decay < math.inf and 0 <= options.grad_clip < math.inf):
        raise InvalidArgument(f"need finite --weight-decay >= 0 and --grad-clip >= 0; "
                              f"got {options.weight_decay}, {options.grad_clip}")
    if options.num_threads:
        torch.set_num_threads(options.num_threads)
    rank, world_size, _, device = distributed.setup_distributed()
    main = distributed.is_main()
    precision = resolve_precision(options.precision, device)
    autocast = autocast_context(precision, device)

    stage.open()
    if RunDir(stage.out).never_checkpointed():
        if main:
            print(f"jetfast {stage.name}: note: {stage.out} holds a run stopped before its first checkpoint; "
                  f"{'there is nothing to resume, ' if options.resume else ''}starting it again", file=sys.stderr)
        options.resume = False
    distributed.barrier()  # every rank has looked before rank 0 changes the directory
    resumed = None
    if options.resume:
        run = RunDir.prepare(stage.out, resume=True)
        resumed = run.load_checkpoint("last")
        config = run.read_config()
        restore_options(options, config["args"])
        stage.resume(run, resumed, config)
    else:
        # Only rank 0 creates the directory; the others wait so they never see it half-made.
        if main:
            RunDir.prepare(stage.out, overwrite=options.overwrite, readme=stage.readme)
        distributed.barrier()
        run = RunDir(stage.out)
        stage.begin(run, main)

    seed_everything(options.seed)
    try:
        model = stage.build(rank, world_size, device).to(device)
        net = model
        if world_size > 1:
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = stage.build_optimizer(model)
        stopper = EarlyStopping(patience=options.patience)
        start_epoch, step = 0, 0
        if resumed is not None:
            model.load_state_dict(resumed["model"])
            optimizer.load_state_dict(resumed["optimizer"])
            stopper.load_state_dict(resumed["early_stopping"])
            start_epoch, step = resumed["epoch"] + 1, resumed["step"]
            set_rng_state(resumed["rng"])
        scheduler = stage.build_scheduler(optimizer, step)
        on_plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if resumed is not None and "scheduler" in resumed:  # checkpoints of older Transformer runs have none
            scheduler.load_state_dict(resumed["scheduler"])
        if resumed is not None:
            if main:
                run.truncate_metrics(after_epoch=resumed["epoch"])
        elif main:
            stage.write_run_files(run, world_size)

        def checkpoint(epoch: int) -> dict:
            return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "early_stopping": stopper.state_dict(), **stage.checkpoint_extras(), "epoch": epoch, "step": step,
                    "rng": rng_state(), "world_size": world_size}

        total_steps = stage.total_steps
        capped = total_steps is not None
        if main and start_epoch < options.epochs and not (capped and step >= total_steps):
            print(f"jetfast {stage.name}: {stage.describe_start(run, start_epoch, step, world_size)}", file=sys.stderr)
        for epoch in range(start_epoch, options.epochs):
            if stopper.should_stop or (capped and step >= total_steps):
                break
            net.train()
            sums: dict[str, float] = {}
            items = 0
            started = time.perf_counter()
            bar = tqdm(total=stage.steps_per_epoch, desc=f"epoch {epoch + 1}/{options.epochs}", unit="batch",
                       disable=options.no_progress or not main, leave=False, dynamic_ncols=True)
            for batch in stage.batches(epoch):
                if capped and step >= total_steps:
                    break
                with autocast():
                    terms, weight = stage.step(net, batch, step)
                optimize(model, optimizer, terms["loss"], options.grad_clip, step, epoch)
                if not on_plateau:
                    scheduler.step()
                step += 1
                values = {k: float(v.detach()) for k, v in terms.items()}
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v * weight
                items += weight
                bar.set_postfix(stage.progress(values), refresh=False)
                bar.update(1)
            bar.close()
            train_seconds = time.perf_counter() - started

            distributed.broadcast_buffers(model)
            net.eval()
            with autocast():
                val_sums, val_items = stage.validate(model)
            train, train_items = _mean_over_ranks(sums, items, world_size)
            val, _ = _mean_over_ranks(val_sums, val_items, world_size)
            check_finite(val["loss"], step, epoch, what="validation loss")
            if on_plateau:
                scheduler.step(val["loss"])
            improved = stopper.step(stage.monitor(model, val), epoch)
            throughput, digits = stage.throughput
            record = {
                "epoch": epoch,
                "step": step,
                **stage.record(train, val, step),
                "lr": optimizer.param_groups[0]["lr"],
                "precision": precision,
                "time_s": round(time.perf_counter() - started, 3),
                throughput: round(train_items / max(train_seconds, 1e-9), digits),
            }
            if main:
                state = checkpoint(epoch)
                run.save_checkpoint(state, "last")
                if improved:
                    run.save_checkpoint(state, "best")
                run.log_metrics(record)
                plot_losses(run.metrics_path, run.loss_plot, stage.plot_keys)
                print(f"epoch {epoch + 1}/{options.epochs}  {stage.describe_epoch(record)}"
                      + ("  *best" if improved else ""), file=sys.stderr)
            _dump_rank_state(model, rank)
            distributed.barrier()
            if stopper.should_stop and main:
                print(f"jetfast {stage.name}: early stop, no val improvement for {stopper.patience} epochs "
                      f"(best epoch {stopper.best_epoch + 1})", file=sys.stderr)
    finally:
        stage.close()
    return run


PRECISIONS = ("auto", "bf16", "fp32")


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """lr multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def bf16_is_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matrix products in hardware (AVX512-BF16 or AMX on a
    CPU, Ampere or later on CUDA), where bf16 autocast makes training faster, not slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"bf16"`` or ``"fp32"``: what ``--precision`` means on this device (``"auto"`` takes bf16
    where it is native)."""
    if precision not in PRECISIONS:
        raise InvalidArgument(f"precision must be one of {PRECISIONS}; got {precision!r}")
    return "bf16" if precision == "bf16" or (precision == "auto" and bf16_is_native(device)) else "fp32"


def autocast_context(precision: str, device: torch.device):
    """A factory of the context that training steps run in: bf16 autocast (weights, optimizer
    state and losses stay fp32) or nothing."""
    use_bf16 = resolve_precision(precision, device) == "bf16"
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def optimize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float,
             step: int, epoch: int | None = None) -> None:
    """One optimizer step on ``loss``; a NaN/inf loss (on any rank) or gradient norm raises
    :class:`~jetfast.errors.TrainingDiverged` before the weights change."""
    # Every rank must stop at the same step, or the others would wait forever in backward:
    # a NaN/inf on any rank makes the sum non-finite everywhere.
    check_finite(distributed.all_reduce_sum(loss.detach().reshape(1)), step, epoch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
        check_finite(grad_norm, step, epoch, what="gradient norm")
    optimizer.step()


def _mean_over_ranks(sums: dict[str, float], items: float, world_size: int) -> tuple[dict[str, float], float]:
    """Means of summed terms over all ranks' items, and the number of items of all ranks."""
    totals = distributed.all_reduce_mean(torch.tensor([*sums.values(), items], dtype=torch.float64)) * world_size
    means = (totals[:-1] / totals[-1].clamp_min(1)).tolist()
    return dict(zip(sums, means)), float(totals[-1])


def restore_options(options, saved: dict) -> None:
    """Set every option of ``options`` from a run's saved ones, except :data:`RUN_OPTIONS`."""
    names = {f.name for f in fields(options)}
    for key, value in saved.items():
        if key in names and key not in RUN_OPTIONS:
            setattr(options, key, tuple(value) if isinstance(getattr(options, key), tuple) else value)


def _dump_rank_state(model: torch.nn.Module, rank: int) -> None:
    """Write this rank's parameters when JETFAST_RANK_STATE_DIR is set (used to check DDP keeps ranks equal)."""
    out = os.environ.get("JETFAST_RANK_STATE_DIR")
    if out:
        os.makedirs(out, exist_ok=True)
        torch.save(model.state_dict(), os.path.join(out, f"rank{rank}.pt"))


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
