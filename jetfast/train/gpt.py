"""Training the class-conditional code Transformer (stage 2, ``jetfast train-gpt``).

Reads the codes file written by ``jetfast encode`` (:mod:`jetfast.latent.codes`),
conditions on the class and, when the codes carry them, on the jets' pT and mass, trains on
its training split, selects the best epoch on the validation split (by the jets it generates
for the validation jets, decoded by the VAE, :mod:`jetfast.train.fidelity`; or by the
validation loss) and never touches the test split. AdamW (no decay on LayerNorm, biases, embeddings), linear warm-up
then cosine decay per optimizer step, gradient clipping.

The run directory (default ``RUN_DIR/gpt``) holds config.json, metrics.jsonl
(losses in nats per code; ``val_bpd`` = bits per latent dimension), checkpoints
(last.pt, best.pt: model, optimizer, scheduler, early stopping, RNG, epoch, step; load
the model with :func:`jetfast.models.gpt.load_gpt`) and plots/loss.png. The loop, resume
and torchrun are :mod:`jetfast.train.loop`'s.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from jetfast import distributed
from jetfast.data.format import CLASS_NAMES
from jetfast.errors import CodesFileError, InvalidArgument
from jetfast.latent.codes import TEST, TRAIN, VAL, draw_codes, read_codes
from jetfast.models.gpt import GPT, GPTConfig
from jetfast.run import GPT_README, RunDir
from jetfast.train.fidelity import SampleFidelity
from jetfast.train.loop import Stage, fit, warmup_cosine

@dataclass
class GPTTraining:
    """Every option of a Transformer training run: those of ``jetfast train-gpt``, by the
    same names (config.json records them under "args")."""

    run_dir: str
    codes: str | None = None  # default RUN_DIR/codes.h5
    out: str | None = None  # default RUN_DIR/gpt
    resume: bool = False
    overwrite: bool = False
    d_model: int = 256
    n_heads: int = 8
    n_layers: int = 4
    dropout: float = 0.1
    tie_weights: bool = False
    code_values: bool = True
    kinematic: bool = True  # conditioned on pT and mass when the codes carry them
    p_uncond: float = 0.1
    posterior_draws: bool = False  # train on codes redrawn from each jet's posterior (the codes carry its width)
    select: str = "fidelity"  # the best checkpoint: by the jets generated for the validation jets, or by "loss"
    epochs: int = 30
    max_steps: int | None = None
    batch_size: int = 256
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # default 5% of all steps, at most 1000
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    patience: int = 0
    seed: int = 0
    precision: str = "auto"
    num_threads: int | None = None
    no_progress: bool = False


def train_gpt(run_dir, **options) -> RunDir:
    """Train the code Transformer on the codes of the VAE run ``run_dir``; return its run directory.

    ``options`` are the fields of :class:`GPTTraining` (``codes=None`` for RUN_DIR/codes.h5,
    ``out=None`` for RUN_DIR/gpt, ``epochs=30``, ...). Under torchrun every process calls this.
    """
    return fit(GPTStage(GPTTraining(run_dir=run_dir, **options)))


class GPTStage(Stage):
    """The Transformer as a training stage: shuffled rows of the codes file, the
    cross-entropy of every code, a warm-up + cosine schedule stepped per optimizer step."""

    name = "train-gpt"
    readme = GPT_README
    throughput = ("codes_per_s", 1)
    plot_keys = ("train_loss", "val_loss")

    def __init__(self, options: GPTTraining):
        super().__init__(options)
        run = RunDir(options.run_dir)
        self.out = Path(options.out) if options.out else run.gpt.path
        self.codes_path = Path(options.codes) if options.codes else run.codes_path

    def open(self) -> None:
        o = self.options
        if o.max_steps is not None and o.max_steps < 1:
            raise InvalidArgument(f"--max-steps must be >= 1; got {o.max_steps}")
        if not 0.0 <= o.p_uncond < 1.0:
            raise InvalidArgument(f"--p-uncond must be in [0, 1); got {o.p_uncond}")
        if o.select not in ("fidelity", "loss"):
            raise InvalidArgument(f"--select must be fidelity or loss; got {o.select!r}")
        if not 0.0 <= o.min_lr_ratio <= 1.0 or (o.warmup_steps is not None and o.warmup_steps < 0):
            raise InvalidArgument(f"need --min-lr-ratio in [0, 1] and --warmup-steps >= 0; "
                                  f"got {o.min_lr_ratio}, {o.warmup_steps}")
        self.data = read_codes(self.codes_path)
        # A fresh run's model (a resumed one takes its checkpoint's): its checks run before the run directory exists.
        self.model_config = GPTConfig(
            vocab_size=self.data["num_bins"], seq_len=self.data["latent_dim"], d_model=o.d_model, n_heads=o.n_heads,
            n_layers=o.n_layers, dropout=o.dropout, num_classes=2, tie_weights=o.tie_weights,
            code_values=o.code_values and self.data["centers"] is not None,
            kinematic=o.kinematic and self.data["pt"] is not None and self.data["m0"] is not None,
            value_shift=o.code_values and self.data["centers"] is not None,
        )
        self._check_draws()
        if o.kinematic and not self.model_config.kinematic:
            print(f"jetfast train-gpt: note: {self.codes_path} carries no pt and m0, so the Transformer is conditioned "
                  "on the class only (encode a jet file that has them to condition on pT and mass)", file=sys.stderr)

    def resume(self, run: RunDir, state: dict, config: dict) -> None:
        if self.data["path"] != config["codes"]:
            print(f"jetfast train-gpt: note: resuming with --codes {self.data['path']}; the run was started on "
                  f"{config['codes']}", file=sys.stderr)
        self.model_config = GPTConfig.from_dict(state["config"])

    def _check_draws(self) -> None:
        if self.options.posterior_draws and (self.data["posterior_std"] is None or self.data["centers"] is None):
            raise CodesFileError(f"{self.codes_path} carries no posterior widths (posterior_std) or bin centers, "
                                 "which --posterior-draws draws from: encode the jets again with `jetfast encode`")

    def build(self, rank: int, world_size: int, device: torch.device) -> GPT:
        o, data = self.options, self.data
        self._check_draws()  # (again: a resumed run takes its saved options after open)
        self.rank, self.world_size, self.device = rank, world_size, device
        codes = torch.from_numpy(data["codes"])
        labels = torch.from_numpy(data["labels"])
        self.split = data["split"]
        train_rows = torch.from_numpy(np.nonzero(self.split == TRAIN)[0])
        val_rows = torch.from_numpy(np.nonzero(self.split == VAL)[0])
        if len(train_rows) < world_size or len(val_rows) == 0:
            raise CodesFileError(f"{data['path']}: need training (split {TRAIN}) and validation (split {VAL}) codes; "
                                 f"got {len(train_rows)} and {len(val_rows)}")
        self.n_train, self.n_val = len(train_rows), len(val_rows)
        self.train_codes, self.train_labels = codes[train_rows], labels[train_rows]
        self.val_codes, self.val_labels = codes[val_rows], labels[val_rows]
        # The codes the marginals, the value table and the validation are measured on: with posterior
        # draws, one fixed draw of each jet (the training steps draw afresh).
        seen_train = self.train_codes
        if o.posterior_draws:
            self.centers = torch.from_numpy(data["centers"])
            std = torch.from_numpy(data["posterior_std"])
            self.train_std = std[train_rows]
            seen_train = draw_codes(self.train_codes, self.train_std, self.centers, self._generator(-1))
            self.val_codes = draw_codes(self.val_codes, std[val_rows], self.centers, self._generator(-2))
        if self.model_config.kinematic:
            # (N, 2): pT and mass in GeV, the order of KINEMATICS.
            kinematics = torch.from_numpy(np.stack([data["pt"], data["m0"]], axis=1).astype(np.float32))
            self.train_kinematics, self.val_kinematics = kinematics[train_rows], kinematics[val_rows]
        self.marginal = marginal_bits(seen_train, self.val_codes, self.model_config.vocab_size)
        self.fidelity = self._sample_fidelity(val_rows.numpy())
        self.per_rank = self.n_train // world_size
        self.steps_per_epoch = math.ceil(self.per_rank / o.batch_size)
        self.total_steps = o.epochs * self.steps_per_epoch
        if o.max_steps is not None:
            self.total_steps = min(self.total_steps, o.max_steps)
        self.warmup = o.warmup_steps if o.warmup_steps is not None else min(1000, max(1, self.total_steps // 20))
        self.model = GPT(self.model_config)
        if self.model_config.code_values:
            centers = torch.from_numpy(data["centers"]).double()
            latents = centers.gather(1, seen_train.long().T).T  # (N, D): the training codes' values
            self.model.set_code_values(centers, latents.mean(0), latents.std(0))
        if self.model_config.kinematic:
            self.model.set_kinematics(self.train_kinematics[:, 0], self.train_kinematics[:, 1])
        return self.model

    def _sample_fidelity(self, val_rows: np.ndarray):
        """The measure of the generated jets that selects the best epoch (``select="fidelity"``), or
        None where the codes cannot be traced to their VAE run and jets (then the validation loss)."""
        o, data = self.options, self.data
        if o.select != "fidelity":
            return None
        run = RunDir(o.run_dir)
        missing = [what for what, ok in (("the VAE checkpoint", run.checkpoint("best").is_file()),
                                         ("the bins (bins.npz)", run.bins_path.is_file()),
                                         ("the jet rows (index)", data["index"] is not None),
                                         ("the jet file", data["data"] is not None and Path(data["data"]).is_file()))
                   if not ok]
        if missing:
            print(f"jetfast train-gpt: note: the best epoch is chosen by the validation loss: the generated jets "
                  f"cannot be compared with the validation jets without {', '.join(missing)} "
                  f"(run {run.path}, codes {self.codes_path})", file=sys.stderr)
            return None
        kinematics = None
        if data["pt"] is not None and data["m0"] is not None:
            kinematics = np.stack([data["pt"][val_rows], data["m0"][val_rows]], axis=1)
        return SampleFidelity(run.path, data["data"], data["index"][val_rows], data["labels"][val_rows], kinematics,
                              seed=o.seed)

    def monitor(self, model: GPT, val: dict) -> float:
        if self.fidelity is None:
            return val["loss"]
        # Generating and decoding the validation jets takes seconds to minutes, and every rank would
        # get the same score (the same seed and weights): rank 0 measures, the others wait for it.
        score = self.fidelity(model) if distributed.is_main() else math.nan
        self.last_fidelity = distributed.broadcast_from_main(score)
        return self.last_fidelity

    def kinematics(self, which: str, rows, p_hide: float = 0.0):
        """The (pT, mass) of ``rows`` of the train or val jets, each hidden (NaN) with probability
        ``p_hide``; None for a model conditioned on the class only."""
        if not self.model_config.kinematic:
            return None
        values = getattr(self, f"{which}_kinematics")[rows].to(self.device)
        if p_hide > 0:
            values = values.masked_fill(torch.rand(values.shape, device=values.device) < p_hide, float("nan"))
        return values

    def build_optimizer(self, model: GPT) -> torch.optim.Optimizer:
        o = self.options
        self.optimizer = torch.optim.AdamW(parameter_groups(model, o.weight_decay), lr=o.lr, betas=(0.9, 0.95))
        return self.optimizer

    def build_scheduler(self, optimizer: torch.optim.Optimizer, step: int):
        # On resume the schedule follows the (possibly longer) new run from the saved step.
        schedule = warmup_cosine(self.warmup, self.total_steps, self.options.min_lr_ratio)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule, last_epoch=step - 1)

    def checkpoint_extras(self) -> dict:
        return {"config": vars(self.model_config).copy(), "codes": self.data["path"]}

    def write_run_files(self, run: RunDir, world_size: int) -> None:
        o, config = self.options, self.model_config
        run.write_config({
            "command": "train-gpt",
            "codes": self.data["path"],
            "vae_run": str(Path(o.run_dir).resolve()),
            "n_train": self.n_train, "n_val": self.n_val, "n_test": int((self.split == TEST).sum()),
            "num_bins": self.data["num_bins"], "latent_dim": self.data["latent_dim"],
            "class_tokens": {**{f"{name} (y={label})": config.vocab_size + label
                                for label, name in sorted(CLASS_NAMES.items())},
                             "unconditional": config.unconditional_token},
            "model": vars(config) | {"parameters": self.model.num_parameters()},
            "world_size": world_size, "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
            "warmup_steps": self.warmup,
            "posterior_draws": o.posterior_draws,
            "select": {"by": "fidelity" if self.fidelity is not None else "loss",
                       "what": "the best checkpoint: the epoch whose jets, generated for the validation jets and "
                               "decoded, are closest to them (val_fidelity: the mean over the observables of "
                               "W1 / the real std), or the lowest validation loss"},
            "kinematics": self.kinematics_seen(),
            "marginal_bpd": {**self.marginal, "what": "bits per code of the per-dimension histograms of the training "
                             "codes: their entropy, and the cross-entropy of the validation codes under them "
                             "(add-one smoothing); a model that learned only the marginals has val_bpd near the latter"
                             + ("; with posterior_draws, both are one fixed draw from each jet's posterior" if o.posterior_draws
                                else "")},
            "args": asdict(o),
        })

    def kinematics_seen(self) -> dict | None:
        """The range of the training jets' pT and mass (GeV), as saved with the model: requests outside
        it are extrapolations."""
        if not self.model_config.kinematic:
            return None
        ranges = self.model.kinematic_range.tolist()
        return {"pt_gev": ranges[0], "m0_gev": ranges[1],
                "what": "min and max over the training jets; the model is conditioned on log pT and log(1 + m0)"}

    def batches(self, epoch: int):
        # Same permutation on every rank; each takes its own interleaved shard.
        shuffle = torch.Generator()
        shuffle.manual_seed(self.options.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n_train, generator=shuffle)[self.rank : self.per_rank * self.world_size : self.world_size]
        for start in range(0, self.per_rank, self.options.batch_size):
            yield order[start : start + self.options.batch_size]

    def _generator(self, step: int, rank: int = 0) -> torch.Generator:
        """The noise of the posterior draws of optimizer step ``step`` on ``rank`` (-1, -2: the fixed
        draws of the training and validation codes, alike on every rank), the same on a resumed run."""
        return torch.Generator().manual_seed((self.options.seed * 1_000_003 + step + 2) * 4099 + rank)

    def step(self, net, rows, step: int):
        codes = self.train_codes[rows]
        if self.options.posterior_draws:
            codes = draw_codes(codes, self.train_std[rows], self.centers, self._generator(step, self.rank))
        inputs, targets = sequences(self.model_config, self.model.to_sequence(codes.to(self.device)),
                                    self.train_labels[rows].to(self.device), self.options.p_uncond)
        logits = net(inputs, kinematics=self.kinematics("train", rows, self.options.p_uncond))  # (B, D, vocab)
        return {"loss": F.cross_entropy(logits.flatten(0, 1), targets.flatten())}, targets.numel()

    def validate(self, model: GPT):
        """Summed cross-entropy, conditional (class, and pT and mass for a kinematic model) and
        unconditional, over this rank's shard of the validation codes."""
        config, batch_size = self.model_config, self.options.batch_size
        conditional = unconditional = 0.0
        codes = 0
        shard = torch.arange(self.rank, self.n_val, self.world_size)
        with torch.no_grad():
            for start in range(0, len(shard), batch_size):
                rows = shard[start : start + batch_size]
                inputs, targets = sequences(config, model.to_sequence(self.val_codes[rows].to(self.device)),
                                            self.val_labels[rows].to(self.device))
                logits = model(inputs, kinematics=self.kinematics("val", rows))
                conditional += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
                inputs[:, 0] = config.unconditional_token
                unconditional += float(F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), reduction="sum"))
                codes += targets.numel()
        return {"loss": conditional, "loss_uncond": unconditional}, codes

    def record(self, train: dict, val: dict, step: int) -> dict:
        return {
            "train_loss": train["loss"],
            "val_loss": val["loss"],
            "val_bpd": val["loss"] / math.log(2),
            "val_bpd_uncond": val["loss_uncond"] / math.log(2),
            "marginal_val_bpd": self.marginal["val"],
            **({"val_fidelity": self.last_fidelity} if self.fidelity is not None else {}),
        }

    def progress(self, terms: dict) -> dict:
        return {"loss": f"{terms['loss']:.4f}", "lr": f"{self.optimizer.param_groups[0]['lr']:.2e}"}

    def describe_start(self, run: RunDir, start_epoch: int, step: int, world_size: int) -> str:
        config = self.model_config
        return (f"{self.n_train} train / {self.n_val} val sequences of {config.seq_len} codes ({config.vocab_size} bins), "
                f"{self.model.num_parameters():,} parameters, {self.steps_per_epoch} steps per epoch x {world_size} "
                f"process(es), run directory {run.path}; per-dimension histograms of the codes: entropy "
                f"{self.marginal['train']:.3f} bits/dim, {self.marginal['val']:.3f} on the validation codes")

    def describe_epoch(self, record: dict) -> str:
        return (f"train {record['train_loss']:.4f}  val {record['val_loss']:.4f} nats/code "
                f"({record['val_bpd']:.3f} bits/dim, unconditional {record['val_bpd_uncond']:.3f}, marginals "
                f"{record['marginal_val_bpd']:.3f})"
                + (f"  generated jets {record['val_fidelity']:.4f}" if "val_fidelity" in record else "")
                + f"  lr {record['lr']:.2e}")


def marginal_bits(train_codes: torch.Tensor, val_codes: torch.Tensor, vocab: int) -> dict:
    """Bits per code of the independent per-dimension histograms of the training codes: their
    entropy (``train``) and the cross-entropy of the validation codes under them with add-one
    smoothing (``val``), the baseline a sequence model must beat."""
    dims = train_codes.shape[1]
    counts = torch.zeros(dims, vocab, dtype=torch.float64)
    counts.scatter_add_(1, train_codes.long().T, torch.ones(train_codes.T.shape, dtype=torch.float64))
    p = counts / counts.sum(1, keepdim=True).clamp_min(1)
    entropy = -(p * torch.log2(p.clamp_min(1e-300))).sum(1).mean()
    smoothed = (counts + 1) / (counts.sum(1, keepdim=True) + vocab)
    val = -torch.log2(smoothed.gather(1, val_codes.long().T)).mean() if len(val_codes) else torch.tensor(float("nan"))
    return {"train": float(entropy), "val": float(val)}


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay the Linear matrices only (not LayerNorm, biases or embeddings)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, torch.nn.Linear) and name == "weight":
                decay.append(param)
            else:
                no_decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def sequences(model_config, codes, labels, p_uncond: float = 0.0):
    """Model input [class_token, c_0..c_{D-2}] and targets [c_0..c_{D-1}], both (B, D) int64, from
    codes in the model's reading order (:meth:`GPT.to_sequence`)."""
    targets = codes.long()
    class_tokens = model_config.vocab_size + labels
    if p_uncond > 0:
        dropped = torch.rand(labels.shape, device=labels.device) < p_uncond
        class_tokens = torch.where(dropped, model_config.unconditional_token, class_tokens)
    inputs = torch.cat([class_tokens[:, None], targets[:, :-1]], dim=1)
    return inputs, targets
