"""``jetfast train-vae``: train the stage-1 convolutional VAE on a jet file.

Single process::

    jetfast train-vae --data jets.h5 --out runs/vae --epochs 20

Data parallel on several processes (gloo on CPUs, NCCL on GPUs)::

    torchrun --nproc_per_node 4 -m jetfast.cli train-vae --data jets.h5 --out runs/vae

The jets are split once into train/val/test by index (``split.npz``); the intensity
transform is fitted on training jets only, the learning-rate schedule, early stopping
and ``best.pt`` follow the validation loss, and the test jets are left for
``jetfast evaluate-vae``. See :mod:`jetfast.run` for the run directory layout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jetfast.run import RunDir

DESCRIPTION = __doc__.split("\n\n")[0]


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated channel counts like 32,64,128,256; got {text!r}")
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"channel counts must be positive; got {text!r}")
    return widths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    io = parser.add_argument_group("input and output")
    io.add_argument("--data", required=True, help="HDF5 jet file: X_jets (N,125,125,3) and y (N,)")
    io.add_argument("--out", required=True, help="run directory to create (config, metrics, checkpoints, plots)")
    io.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt")
    io.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    io.add_argument("--max-jets", type=int, default=None, help="use only the first N jets of the file")
    io.add_argument("--val-fraction", type=float, default=0.1, help="fraction of jets for validation")
    io.add_argument("--test-fraction", type=float, default=0.1, help="fraction of jets held out for evaluation")
    io.add_argument("--transform-jets", type=int, default=1000,
                    help="training jets used to fit the intensity transform")

    model = parser.add_argument_group("model")
    model.add_argument("--latent-dim", type=int, default=128, help="latent dimensions")
    model.add_argument("--widths", type=_widths, default=(32, 64, 128, 256),
                       help="encoder channels per stride-2 stage (decoder mirrors them)")
    model.add_argument("--beta", type=float, default=1.0, help="weight of the KL term")
    model.add_argument("--recon", choices=("mse", "gaussian_nll"), default="mse",
                       help="reconstruction term: squared error, or Gaussian NLL with learned per-channel variance")
    model.add_argument("--kl-warmup-epochs", type=float, default=1.0,
                       help="epochs over which the KL weight ramps linearly from 0 to --beta")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=20, help="maximum number of epochs")
    opt.add_argument("--batch-size", type=int, default=64, help="jets per step (per process under torchrun)")
    opt.add_argument("--lr", type=float, default=1e-3, help="initial learning rate")
    opt.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (AdamW when > 0, else Adam)")
    opt.add_argument("--grad-clip", type=float, default=5.0, help="clip the global gradient norm (0: off)")
    opt.add_argument("--lr-patience", type=int, default=2, help="epochs without val improvement before halving the lr")
    opt.add_argument("--patience", type=int, default=6, help="epochs without val improvement before stopping (0: never)")

    from jetfast.train.common import add_execution_arguments

    run = add_execution_arguments(parser, seed_help="seed for the split, initialisation, shuffling and sampling")
    run.add_argument("--loader-threads", type=int, default=None, help="decoding threads of the jet loader")


def run(args: argparse.Namespace) -> int:
    from jetfast.errors import JetFileError
    from jetfast.train.common import run_trainer

    return run_trainer("train-vae", train, args, (JetFileError,))


# -- training ----------------------------------------------------------------------------------
def _run_config(args, n_file: int, n_used: int, split, vae_config, transform, world_size: int, steps_per_epoch: int) -> dict:
    import torch

    import jetfast

    return {
        "command": "train-vae",
        "description": "jetfast stage-1 VAE run; see README.txt for the files in this directory",
        "data": os.path.abspath(args.data),
        "n_jets_in_file": n_file,
        "n_jets_used": n_used,
        "split": {
            "seed": args.seed,
            "fractions": [1 - args.val_fraction - args.test_fraction, args.val_fraction, args.test_fraction],
            "sizes": {k: int(len(v)) for k, v in split.items()},
            "file": "split.npz",
        },
        "vae": vae_config.to_dict(),
        "transform": transform.to_dict(),
        "training": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "world_size": world_size,
            "steps_per_epoch": steps_per_epoch,
            "optimizer": "AdamW" if args.weight_decay > 0 else "Adam",
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "grad_clip": args.grad_clip,
            "lr_schedule": f"ReduceLROnPlateau(val_loss, factor=0.5, patience={args.lr_patience})",
            "early_stopping_patience": args.patience,
            "kl_warmup_epochs": args.kl_warmup_epochs,
            "seed": args.seed,
            "num_threads": args.num_threads,
        },
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if not k.startswith("_")},
        "versions": {"jetfast": jetfast.__version__, "torch": torch.__version__},
        "metrics": {
            "file": "metrics.jsonl",
            "keys": ["epoch", "step", "train_loss", "train_recon", "train_kl", "val_loss", "val_recon", "val_kl",
                     "beta", "lr", "time_s", "images_per_s"],
            "note": "per-jet means; train_* average the epoch's steps (KL weight 'beta' ramping during warm-up), "
                    "val_* use the full beta; images_per_s counts training images of all processes",
        },
    }


def _fit_transform(path: str, train_indices, max_jets: int, seed: int, loader_threads: int | None):
    """Fit the intensity transform on a random sample of training jets."""
    import numpy as np
    import torch

    from jetfast.data.loader import JetLoader
    from jetfast.data.transforms import IntensityTransform, crop_to_image

    rng = np.random.default_rng(seed)
    take = min(len(train_indices), max(1, max_jets))
    sample = rng.choice(train_indices, size=take, replace=False)
    # Physical units (transform=None); every rank draws the same sample, so all fit the same transform.
    with JetLoader(path, 256, indices=sample, shuffle=False, transform=None, keys=("X_jets",),
                   num_threads=loader_threads, rank=0, world_size=1) as loader:
        images = torch.cat([crop_to_image(batch["X_jets"]) for batch in loader])
    return IntensityTransform.fit(images.numpy())


def _raise_if_bad_pixels(path: str, x, index, step: int) -> None:
    """After a non-finite loss: blame the data, naming the jets, when the batch itself holds NaN/inf."""
    import torch

    from jetfast.errors import JetFileError

    bad = ~torch.isfinite(x.detach()).flatten(1).all(dim=1)
    if bad.any():
        jets = index[bad.cpu()].tolist()
        shown = ", ".join(map(str, jets[:10])) + (" ..." if len(jets) > 10 else "")
        raise JetFileError(f"{path}: jet(s) {shown} have NaN or infinite pixels (found at step {step}); "
                           "remove them from the file or leave them out of the run")


def _warn_if_unbalanced(path: str, n_used: int) -> None:
    """--max-jets takes the first N jets; say so when that leaves the classes badly unbalanced."""
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        labels = f["y"][:n_used]
    values, counts = np.unique(labels, return_counts=True)
    if len(values) < 2 or counts.min() < 0.3 * n_used:
        share = ", ".join(f"y={v:g}: {c}" for v, c in zip(values, counts))
        print(f"jetfast train-vae: warning: the {n_used} jets used have unbalanced classes ({share}); "
              "if the file is sorted by class, use a shuffled copy or more jets", file=sys.stderr)


def _epoch_totals(model, loader, beta: float, device, progress=None):
    """Validation: summed loss terms and jet count over ``loader`` (no gradients)."""
    import torch

    totals = torch.zeros(4, dtype=torch.float64)  # loss, recon, kl (batch sums), jets
    with torch.no_grad():
        for batch in loader:
            x = batch["X_jets"].to(device, non_blocking=True)
            x_hat, mu, logvar = model(x)
            terms = model.loss(x, x_hat, mu, logvar, beta)
            n = x.shape[0]
            totals += torch.tensor([float(terms["loss"]) * n, float(terms["recon"]) * n, float(terms["kl"]) * n, n], dtype=torch.float64)
            if progress is not None:
                progress.update(1)
    return totals


def train_step(model, net, optimizer, x, beta: float, grad_clip: float, step: int, epoch: int | None = None) -> list[float]:
    """One optimiser step on the transformed batch ``x``; returns [loss, recon, kl].

    ``net`` is ``model`` or its DistributedDataParallel wrapper. A NaN/inf loss or gradient
    norm raises :class:`~jetfast.errors.TrainingDiverged` before the weights change.
    """
    import torch

    from jetfast.distributed import is_distributed
    from jetfast.train.common import check_finite

    x_hat, mu, logvar = net(x)
    terms = model.loss(x, x_hat, mu, logvar, beta)
    loss_seen = terms["loss"].detach()
    if is_distributed():
        # Every rank must stop at the same step, or the others would wait forever in backward.
        import torch.distributed as dist

        loss_seen = loss_seen.reshape(1).clone()
        dist.all_reduce(loss_seen)  # a NaN/inf on any rank makes the sum non-finite everywhere
    check_finite(loss_seen, step, epoch)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
        check_finite(grad_norm, step, epoch, what="gradient norm")
    optimizer.step()
    return [float(terms[k].detach()) for k in ("loss", "recon", "kl")]


def _sync_buffers(module) -> None:
    """Copy rank 0's BatchNorm running statistics to every rank before evaluating.

    DDP broadcasts buffers at the start of each forward, so after the last training step
    each rank still holds statistics updated by its own last batch.
    """
    from jetfast.distributed import broadcast_buffers

    broadcast_buffers(module)


def train(args: argparse.Namespace) -> RunDir:
    """Run the training described by the ``train-vae`` arguments; return the run directory."""
    import torch
    from tqdm.auto import tqdm

    from jetfast.data.format import validate_jet_file
    from jetfast.data.loader import JetLoader
    from jetfast.data.transforms import IntensityTransform
    from jetfast.models.vae import VAE, VAEConfig
    from jetfast.distributed import all_reduce_mean, barrier, is_main, setup_distributed
    from jetfast.errors import TrainingDiverged
    from jetfast.run import RunDir, load_split, make_split, save_split
    from jetfast.train.common import EarlyStopping, check_finite, end_epoch, rng_state, seed_everything, set_rng_state

    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise ValueError(f"need --epochs >= 1, --batch-size >= 1 and --lr > 0; got {args.epochs}, {args.batch_size}, {args.lr}")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    rank, world_size, _, device = setup_distributed()
    main = is_main()

    n_file = validate_jet_file(args.data)
    resume_state = None
    if args.resume:
        run_dir = RunDir.prepare(args.out, resume=True)
        resume_state = run_dir.load_checkpoint("last")
        saved = run_dir.read_config()
        if os.path.abspath(args.data) != saved["data"]:
            print(f"jetfast train-vae: note: resuming with --data {args.data}; the run was started on {saved['data']}",
                  file=sys.stderr)
        split = load_split(run_dir)
        n_used = saved["n_jets_used"]
        if n_used > n_file:
            raise ValueError(f"{args.data} has {n_file} jets but the run used {n_used}; resume with the original file")
        # The model and data are the run's; only the length of training may change on resume.
        epochs = args.epochs
        for key, value in saved["args"].items():
            if hasattr(args, key) and key not in ("resume", "overwrite", "out", "data", "no_progress", "num_threads", "loader_threads"):
                setattr(args, key, tuple(value) if key == "widths" else value)
        args.epochs = epochs
        vae_config = VAEConfig.from_dict(resume_state["vae_config"])
        transform = IntensityTransform.from_dict(resume_state["transform"])
    else:
        # Only rank 0 creates the directory; the others wait so they never see it half-made.
        if main:
            run_dir = RunDir.prepare(args.out, overwrite=args.overwrite)
        barrier()
        run_dir = RunDir(args.out)
        n_used = min(n_file, args.max_jets) if args.max_jets else n_file
        if main:
            _warn_if_unbalanced(args.data, n_used)
        fractions = (1 - args.val_fraction - args.test_fraction, args.val_fraction, args.test_fraction)
        split = make_split(n_used, fractions, seed=args.seed)
        transform = _fit_transform(args.data, split["train"], args.transform_jets, args.seed, args.loader_threads)
        vae_config = VAEConfig(latent_dim=args.latent_dim, widths=args.widths, beta=args.beta, recon=args.recon)

    seed_everything(args.seed)
    train_loader = JetLoader(args.data, args.batch_size, indices=split["train"], shuffle=True, seed=args.seed,
                             num_threads=args.loader_threads, transform=transform)
    val_loader = JetLoader(args.data, args.batch_size, indices=split["val"], shuffle=False,
                           num_threads=args.loader_threads, transform=transform)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f"the training split has {len(split['train'])} jets: too few for {world_size} process(es)")
    vae_config.kl_warmup_steps = int(round(args.kl_warmup_epochs * steps_per_epoch))

    model = VAE(vae_config).to(device)
    net = model
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = torch.optim.AdamW if args.weight_decay > 0 else torch.optim.Adam
    optimizer = opt_cls(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=args.lr_patience)
    stopper = EarlyStopping(patience=args.patience)
    start_epoch, step = 0, 0

    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        stopper.load_state_dict(resume_state["early_stopping"])
        start_epoch, step = resume_state["epoch"] + 1, resume_state["step"]
        set_rng_state(resume_state["rng"])
        if main:
            run_dir.truncate_metrics(after_epoch=resume_state["epoch"])
    elif main:
        run_dir.write_config(_run_config(args, n_file, n_used, split, vae_config, transform, world_size, steps_per_epoch))
        save_split(run_dir, split)

    def checkpoint(epoch: int) -> dict:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "early_stopping": stopper.state_dict(),
            "vae_config": vae_config.to_dict(),
            "transform": transform.to_dict(),
            "epoch": epoch,
            "step": step,
            "rng": rng_state(),
            "world_size": world_size,
        }

    if main and start_epoch < args.epochs:
        print(f"jetfast train-vae: {len(split['train'])} train / {len(split['val'])} val / {len(split['test'])} test jets, "
              f"{steps_per_epoch} steps per epoch x {world_size} process(es), loader backend {train_loader.backend}, "
              f"run directory {run_dir.path}" + (f", resuming at epoch {start_epoch + 1} (step {step})" if start_epoch else ""),
              file=sys.stderr)
    for epoch in range(start_epoch, args.epochs):
        if stopper.should_stop:
            break
        train_loader.set_epoch(epoch)
        net.train()
        totals = torch.zeros(4, dtype=torch.float64)
        started = time.perf_counter()
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch",
                   disable=args.no_progress or not main, leave=False, dynamic_ncols=True)
        for batch in train_loader:
            x = batch["X_jets"].to(device, non_blocking=True)
            beta = model.beta_at(step)
            try:
                values = train_step(model, net, optimizer, x, beta, args.grad_clip, step, epoch)
            except TrainingDiverged:
                _raise_if_bad_pixels(args.data, x, batch["index"], step)
                raise
            step += 1
            n = x.shape[0]
            totals += torch.tensor([v * n for v in values] + [n], dtype=torch.float64)
            bar.set_postfix(loss=f"{values[0]:.4g}", recon=f"{values[1]:.4g}", kl=f"{values[2]:.3g}", beta=f"{beta:.2g}", refresh=False)
            bar.update(1)
        bar.close()
        train_seconds = time.perf_counter() - started

        _sync_buffers(model)
        net.eval()
        # Validation always weighs the KL with the full beta: the objective being selected on
        # must not change during the warm-up, or the scheduler would read the ramp as a plateau.
        val_totals = _epoch_totals(model, val_loader, vae_config.beta, device)
        train_totals = all_reduce_mean(totals) * world_size
        val_totals = all_reduce_mean(val_totals) * world_size
        train_mean = (train_totals[:3] / train_totals[3]).tolist()
        val_mean = (val_totals[:3] / val_totals[3].clamp_min(1)).tolist()
        check_finite(val_mean[0], step, epoch, what="validation loss")

        scheduler.step(val_mean[0])
        improved = stopper.step(val_mean[0], epoch)
        record = {
            "epoch": epoch,
            "step": step,
            "train_loss": train_mean[0], "train_recon": train_mean[1], "train_kl": train_mean[2],
            "val_loss": val_mean[0], "val_recon": val_mean[1], "val_kl": val_mean[2],
            "beta": model.beta_at(step - 1),  # KL weight of the last training step (validation uses the full beta)
            "lr": optimizer.param_groups[0]["lr"],
            "time_s": round(time.perf_counter() - started, 3),
            "images_per_s": round(float(train_totals[3]) / max(train_seconds, 1e-9), 2),
        }
        if main:
            end_epoch(run_dir, checkpoint(epoch), record, improved)
            print(f"epoch {epoch + 1}/{args.epochs}  train {train_mean[0]:.5g}  val {val_mean[0]:.5g} "
                  f"(recon {val_mean[1]:.5g}, kl {val_mean[2]:.4g})  lr {record['lr']:.2g}  "
                  f"{record['images_per_s']:.1f} images/s" + ("  *best" if improved else ""), file=sys.stderr)
        _dump_rank_state(model, rank)
        barrier()
        if stopper.should_stop and main:
            print(f"jetfast train-vae: early stop, no val improvement for {stopper.patience} epochs "
                  f"(best epoch {stopper.best_epoch + 1})", file=sys.stderr)

    train_loader.close()
    val_loader.close()
    return run_dir


def _dump_rank_state(model, rank: int) -> None:
    """Write this rank's parameters when JETFAST_RANK_STATE_DIR is set (used to check DDP keeps ranks equal)."""
    out = os.environ.get("JETFAST_RANK_STATE_DIR")
    if out:
        import torch

        os.makedirs(out, exist_ok=True)
        torch.save(model.state_dict(), os.path.join(out, f"rank{rank}.pt"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jetfast train-vae", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
