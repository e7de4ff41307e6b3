"""``jetfast train-gpt``: fit the class-conditional code Transformer (stage 2).

Reads the codes file written by ``jetfast encode`` (:mod:`jetfast.latent.codes`),
trains on its training split, selects the best epoch on the validation split and never
touches the test split.

The run directory (default ``RUN_DIR/gpt``) holds config.json, metrics.jsonl
(losses in nats per code; ``val_bpd`` = bits per latent dimension), checkpoints
(last.pt, best.pt; load with :func:`jetfast.models.gpt.load_gpt`) and
plots/loss.png. Runs under ``torchrun`` use DistributedDataParallel (gloo on CPU).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

DESCRIPTION = "train the class-conditional Transformer over latent codes (stage 2)"

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the VAE run directory the codes come from")
    io = parser.add_argument_group("input and output")
    io.add_argument("--codes", default=None,
                    help="codes file from `jetfast encode` (default: RUN_DIR/codes.h5)")
    io.add_argument("--out", default=None, help="GPT run directory (default: RUN_DIR/gpt)")
    io.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt")
    io.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")

    model = parser.add_argument_group("model")
    model.add_argument("--d-model", type=int, default=256, help="width of the residual stream")
    model.add_argument("--n-heads", type=int, default=8, help="attention heads (must divide --d-model)")
    model.add_argument("--n-layers", type=int, default=4, help="Transformer blocks")
    model.add_argument("--dropout", type=float, default=0.1, help="dropout in attention, MLP and embeddings")
    model.add_argument("--tie-weights", action="store_true", help="share the output head with the code embedding")
    model.add_argument("--p-uncond", type=float, default=0.1,
                       help="probability of replacing the class token by the unconditional one")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=30, help="maximum number of epochs")
    opt.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in total")
    opt.add_argument("--batch-size", type=int, default=256, help="sequences per step (per process under torchrun)")
    opt.add_argument("--lr", type=float, default=6e-4, help="peak learning rate")
    opt.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr of the cosine decay, relative to --lr")
    opt.add_argument("--warmup-steps", type=int, default=None,
                     help="linear warm-up steps (default: 5%% of all steps, at most 1000)")
    opt.add_argument("--weight-decay", type=float, default=0.1,
                     help="AdamW weight decay of the matrices (never LayerNorm, biases or embeddings)")
    opt.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    opt.add_argument("--patience", type=int, default=0,
                     help="epochs without val improvement before stopping (0: never)")

    from jetfast.train.common import add_execution_arguments

    add_execution_arguments(parser, seed_help="seed for initialisation, shuffling and class dropout")


def run(args: argparse.Namespace) -> int:
    from jetfast.errors import CodesFileError
    from jetfast.train.common import run_trainer

    return run_trainer("train-gpt", train, args, (CodesFileError,))


# -- training pieces ---------------------------------------------------------------------------
def parameter_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay the Linear matrices only (not LayerNorm, biases or embeddings)."""
    import torch

    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, torch.nn.Linear) and name == "weight":
                decay.append(param)
            else:
                no_decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """lr multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def sequences(model_config, codes, labels, p_uncond: float = 0.0):
    """Model input [class_token, c_0..c_{D-2}] and targets [c_0..c_{D-1}], both (B, D) int64."""
    import torch

    targets = codes.long()
    class_tokens = model_config.vocab_size + labels
    if p_uncond > 0:
        dropped = torch.rand(labels.shape, device=labels.device) < p_uncond
        class_tokens = torch.where(dropped, model_config.unconditional_token, class_tokens)
    inputs = torch.cat([class_tokens[:, None], targets[:, :-1]], dim=1)
    return inputs, targets


def _validation_loss(model, model_config, codes, labels, batch_size: int, device, rank: int, world_size: int):
    """Summed cross-entropy (conditional, unconditional) and the number of codes, over this rank's shard."""
    import torch
    import torch.nn.functional as F

    totals = torch.zeros(3, dtype=torch.float64)
    shard = torch.arange(rank, codes.shape[0], world_size)
    with torch.no_grad():
        for start in range(0, len(shard), batch_size):
            rows = shard[start : start + batch_size]
            batch_codes, batch_labels = codes[rows].to(device), labels[rows].to(device)
            inputs, targets = sequences(model_config, batch_codes, batch_labels)
            conditional = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), reduction="sum")
            inputs[:, 0] = model_config.unconditional_token
            unconditional = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), reduction="sum")
            totals += torch.tensor([float(conditional), float(unconditional), targets.numel()], dtype=torch.float64)
    return totals


def train(args: argparse.Namespace):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from jetfast.data.format import CLASS_NAMES
    from jetfast.distributed import all_reduce_mean, barrier, is_main, setup_distributed
    from jetfast.errors import CodesFileError
    from jetfast.latent.codes import TRAIN, TEST, VAL, read_codes
    from jetfast.models.gpt import GPT, GPTConfig
    from jetfast.run import GPT_README, RunDir
    from jetfast.train.common import EarlyStopping, check_finite, end_epoch, rng_state, seed_everything, set_rng_state

    out = Path(args.out) if args.out else RunDir(args.run_dir).gpt.path
    codes_path = Path(args.codes) if args.codes else RunDir(args.run_dir).codes_path
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise ValueError(f"need --epochs >= 1, --batch-size >= 1 and --lr > 0; got {args.epochs}, {args.batch_size}, {args.lr}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1; got {args.max_steps}")
    if not 0.0 <= args.p_uncond < 1.0:
        raise ValueError(f"--p-uncond must be in [0, 1); got {args.p_uncond}")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    rank, world_size, _, device = setup_distributed()
    main = is_main()

    data = read_codes(codes_path)
    resume_state = None
    if args.resume:
        run_dir = RunDir.prepare(out, resume=True)
        resume_state = run_dir.load_checkpoint("last")
        saved = run_dir.read_config()
        if data["path"] != saved["codes"]:
            print(f"jetfast train-gpt: note: resuming with --codes {data['path']}; the run was started on "
                  f"{saved['codes']}", file=sys.stderr)
        # The model and optimisation are the run's; only how long to train may change on resume.
        keep = {"epochs": args.epochs, "max_steps": args.max_steps, "no_progress": args.no_progress,
                "num_threads": args.num_threads}
        for key, value in saved["args"].items():
            if hasattr(args, key) and key not in ("resume", "overwrite", "out", "codes", "run_dir"):
                setattr(args, key, value)
        for key, value in keep.items():
            setattr(args, key, value)
        model_config = GPTConfig.from_dict(resume_state["config"])
    else:
        if main:
            run_dir = RunDir.prepare(out, overwrite=args.overwrite, readme=GPT_README)
        barrier()
        run_dir = RunDir(out)
        model_config = GPTConfig(
            vocab_size=data["num_bins"], seq_len=data["latent_dim"], d_model=args.d_model, n_heads=args.n_heads,
            n_layers=args.n_layers, dropout=args.dropout, num_classes=2, tie_weights=args.tie_weights,
        )

    codes = torch.from_numpy(data["codes"])
    labels = torch.from_numpy(data["labels"])
    split = data["split"]
    train_rows = torch.from_numpy(np.nonzero(split == TRAIN)[0])
    val_rows = torch.from_numpy(np.nonzero(split == VAL)[0])
    if len(train_rows) < world_size or len(val_rows) == 0:
        raise CodesFileError(f"{data['path']}: need training (split 0) and validation (split 1) codes; "
                             f"got {len(train_rows)} and {len(val_rows)}")
    train_codes, train_labels = codes[train_rows], labels[train_rows]
    val_codes, val_labels = codes[val_rows], labels[val_rows]

    per_rank = len(train_rows) // world_size
    steps_per_epoch = math.ceil(per_rank / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(1000, max(1, total_steps // 20))

    seed_everything(args.seed)
    model = GPT(model_config).to(device)
    net = model
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    stopper = EarlyStopping(patience=args.patience)
    start_epoch, step = 0, 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        stopper.load_state_dict(resume_state["early_stopping"])
        start_epoch, step = resume_state["epoch"] + 1, resume_state["step"]
        set_rng_state(resume_state["rng"])
    # On resume the schedule follows the (possibly longer) new run from the saved step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(warmup, total_steps, args.min_lr_ratio), last_epoch=step - 1
    )
    if resume_state is not None:
        if main:
            run_dir.truncate_metrics(after_epoch=resume_state["epoch"])
    elif main:
        run_dir.write_config({
            "command": "train-gpt",
            "codes": data["path"],
            "vae_run": str(Path(args.run_dir).resolve()),
            "n_train": len(train_rows), "n_val": len(val_rows), "n_test": int((split == TEST).sum()),
            "num_bins": data["num_bins"], "latent_dim": data["latent_dim"],
            "class_tokens": {**{f"{name} (y={label})": model_config.vocab_size + label
                                for label, name in sorted(CLASS_NAMES.items())},
                             "unconditional": model_config.unconditional_token},
            "model": vars(model_config) | {"parameters": model.num_parameters()},
            "world_size": world_size, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
            "warmup_steps": warmup,
            "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        })

    def checkpoint(epoch: int) -> dict:
        return {
            "config": vars(model_config).copy(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "early_stopping": stopper.state_dict(),
            "epoch": epoch,
            "step": step,
            "rng": rng_state(),
            "world_size": world_size,
            "codes": data["path"],
        }

    if main and start_epoch < args.epochs and step < total_steps:
        print(f"jetfast train-gpt: {len(train_rows)} train / {len(val_rows)} val sequences of {model_config.seq_len} "
              f"codes ({model_config.vocab_size} bins), {model.num_parameters():,} parameters, "
              f"{steps_per_epoch} steps per epoch x {world_size} process(es), run directory {run_dir.path}",
              file=sys.stderr)
    shuffle = torch.Generator()
    for epoch in range(start_epoch, args.epochs):
        if stopper.should_stop or step >= total_steps:
            break
        # Same permutation on every rank; each takes its own interleaved shard.
        shuffle.manual_seed(args.seed * 1_000_003 + epoch)
        order = torch.randperm(len(train_rows), generator=shuffle)[rank : per_rank * world_size : world_size]
        net.train()
        totals = torch.zeros(2, dtype=torch.float64)
        started = time.perf_counter()
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch",
                   disable=args.no_progress or not main, leave=False, dynamic_ncols=True)
        for start in range(0, per_rank, args.batch_size):
            if step >= total_steps:
                break
            rows = order[start : start + args.batch_size]
            inputs, targets = sequences(model_config, train_codes[rows].to(device), train_labels[rows].to(device),
                                        args.p_uncond)
            logits = net(inputs)  # (B, D, vocab)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            loss_value = float(loss.detach())
            check_finite(loss_value, step, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                check_finite(grad_norm, step, epoch, what="gradient norm")
            optimizer.step()
            scheduler.step()
            step += 1
            totals += torch.tensor([loss_value * targets.numel(), targets.numel()], dtype=torch.float64)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
            bar.update(1)
        bar.close()
        train_seconds = time.perf_counter() - started

        net.eval()
        val_totals = _validation_loss(model, model_config, val_codes, val_labels, args.batch_size, device, rank,
                                      world_size)
        train_totals = all_reduce_mean(totals) * world_size
        val_totals = all_reduce_mean(val_totals) * world_size
        train_loss = float(train_totals[0] / train_totals[1].clamp_min(1))
        val_loss = float(val_totals[0] / val_totals[2])
        val_loss_uncond = float(val_totals[1] / val_totals[2])
        check_finite(val_loss, step, epoch, what="validation loss")
        improved = stopper.step(val_loss, epoch)
        record = {
            "epoch": epoch,
            "step": step,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_bpd": val_loss / math.log(2),
            "val_bpd_uncond": val_loss_uncond / math.log(2),
            "lr": scheduler.get_last_lr()[0],
            "time_s": round(time.perf_counter() - started, 3),
            "codes_per_s": round(float(train_totals[1]) / max(train_seconds, 1e-9), 1),
        }
        if main:
            end_epoch(run_dir, checkpoint(epoch), record, improved, plot_keys=("train_loss", "val_loss"))
            print(f"epoch {epoch + 1}/{args.epochs}  train {train_loss:.4f}  val {val_loss:.4f} nats/code "
                  f"({record['val_bpd']:.3f} bits/dim, unconditional {record['val_bpd_uncond']:.3f})  "
                  f"lr {record['lr']:.2e}" + ("  *best" if improved else ""), file=sys.stderr)
        barrier()
        if stopper.should_stop and main:
            print(f"jetfast train-gpt: early stop, no val improvement for {stopper.patience} epochs "
                  f"(best epoch {stopper.best_epoch + 1})", file=sys.stderr)
    return run_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jetfast train-gpt", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
