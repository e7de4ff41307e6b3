"""Training the stage-1 convolutional VAE on a jet file (``jetfast train-vae``).

The jets are split once into train/val/test by index (``split.npz``); the intensity
transform is fitted on training jets only, the learning-rate schedule, early stopping
and ``best.pt`` follow the validation loss, and the test jets are left for
``jetfast evaluate-vae``. The loop, resume and torchrun are :mod:`jetfast.train.loop`'s;
the run directory is :mod:`jetfast.run`'s.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass

import h5py
import numpy as np
import torch

import jetfast
from jetfast.data.format import validate_jet_file
from jetfast.data.loader import JetLoader
from jetfast.data.format import IMAGE_KEY, IMAGE_SIZE
from jetfast.data.transforms import PAD_BEFORE, IntensityTransform, crop_to_image
from jetfast.errors import InvalidArgument, JetFileError, RunDirError
from jetfast.models.observation import CHANNEL_NAMES, SparseObservation, hit_statistics
from jetfast.models.vae import (CONDITION_KEYS, VAE, VAEConfig, batch_conditions, condition_features, loader_keys,
                                read_conditions)
from jetfast.run import VAE_README, RunDir, load_split, make_split, save_split
from jetfast.train.loop import Stage, fit, warmup_cosine

@dataclass
class VAETraining:
    """Every option of a VAE training run: those of ``jetfast train-vae``, by the same names
    (config.json records them under "args")."""

    data: str
    out: str
    resume: bool = False
    overwrite: bool = False
    max_jets: int | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    transform_jets: int = 1000
    latent_dim: int = 128
    widths: tuple[int, ...] = (32, 64, 128, 256)
    beta: float = 1.0
    recon: str = "sparse"
    intensity_components: int = 3
    channel_totals: bool = True
    total_correlations: bool = True
    totals_basis: str = "calorimeter"
    pixel_shares: bool = True
    hit_counts: bool = True
    conditioned: bool = True
    kl_warmup_epochs: float = 1.0
    augment: bool = True
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.02
    lr_patience: int = 2
    patience: int = 6
    seed: int = 0
    precision: str = "auto"
    num_threads: int | None = None
    no_progress: bool = False
    loader_threads: int | None = None


def train_vae(data, out, **options) -> RunDir:
    """Train a VAE on the jet file ``data`` into the run directory ``out``; return it.

    ``options`` are the fields of :class:`VAETraining` (``epochs=20``, ``batch_size=64``,
    ``resume=False``, ...). Under torchrun every process calls this and they train together.
    """
    return fit(VAEStage(VAETraining(data=data, out=out, **options)))


class VAEStage(Stage):
    """The VAE as a training stage: jets from the file through the JetLoader in GeV (the
    encoder's input is transformed here, the sparse likelihood scores the GeV pixels, whose
    zeros stay exact), each training jet mirrored in eta and/or phi at random (``augment``:
    both are symmetries of jet images centred on the axis, and they map the HCAL tower grid
    onto itself), the loss terms of :meth:`VAE.loss` (KL weight ramped in),
    the learning rate decayed along a cosine over the run (or halved on plateaus of the
    validation loss)."""

    name = "train-vae"
    readme = VAE_README
    throughput = ("images_per_s", 2)

    def open(self) -> None:
        o = self.options
        if o.max_jets is not None and o.max_jets < 1:
            raise InvalidArgument(f"--max-jets must be >= 1 (leave it out to use every jet); got {o.max_jets}")
        if not (0 <= o.val_fraction and 0 <= o.test_fraction and o.val_fraction + o.test_fraction < 1):
            raise InvalidArgument(f"--val-fraction and --test-fraction must be >= 0 and leave jets to train on "
                                  f"(sum < 1); got {o.val_fraction} and {o.test_fraction}")
        if o.lr_schedule not in ("cosine", "plateau") or not 0 <= o.min_lr_ratio <= 1:
            raise InvalidArgument(f"need --lr-schedule cosine or plateau and --min-lr-ratio in [0, 1]; "
                                  f"got {o.lr_schedule!r}, {o.min_lr_ratio}")
        if o.transform_jets < 1 or not 0 <= o.kl_warmup_epochs < math.inf:
            raise InvalidArgument(f"need --transform-jets >= 1 and a finite --kl-warmup-epochs >= 0; "
                                  f"got {o.transform_jets}, {o.kl_warmup_epochs}")
        # The model's own checks (latent size, widths, beta, ...), before anything is created.
        VAEConfig(latent_dim=o.latent_dim, widths=o.widths, beta=o.beta, recon=o.recon,
                  intensity_components=o.intensity_components, **self._totals_options())
        self.n_file = validate_jet_file(o.data, (IMAGE_KEY, *CONDITION_KEYS) if o.conditioned else (IMAGE_KEY,))

    def begin(self, run: RunDir, main: bool) -> None:
        o = self.options
        self.n_used = min(self.n_file, o.max_jets) if o.max_jets is not None else self.n_file
        if main:
            _warn_if_unbalanced(o.data, self.n_used)
        fractions = (1 - o.val_fraction - o.test_fraction, o.val_fraction, o.test_fraction)
        self.split = make_split(self.n_used, fractions, seed=o.seed)
        images = _sample_images(o.data, self.split["train"], o.transform_jets, o.seed, o.loader_threads)
        self.transform = IntensityTransform.fit(images.numpy())
        totals = self._totals_options()
        hits = hit_statistics(images, totals_basis=totals["totals_basis"], pixel_shares=totals["pixel_shares"])
        self.training_jets, condition = None, {}
        if o.conditioned:
            self.training_jets = _training_jets(o.data, self.split["train"])
            features = condition_features(self.training_jets).double()
            condition = dict(conditioned=True, condition_mean=features.mean(0).tolist(),
                             condition_std=features.std(0).clamp_min(1e-6).tolist())
        self.vae_config = VAEConfig(**condition, latent_dim=o.latent_dim, widths=o.widths, beta=o.beta, recon=o.recon,
                                    intensity_components=o.intensity_components, hit_occupancy=hits["occupancy"],
                                    hit_log_mean=hits["log_mean"], hit_log_std=hits["log_std"],
                                    total_log_mean=hits["total_log_mean"], total_log_std=hits["total_log_std"],
                                    count_log_mean=hits["count_log_mean"], count_log_std=hits["count_log_std"], **totals)

    def _totals_options(self) -> dict:
        """The VAEConfig fields of the channel totals; the totals' options mean nothing without them."""
        o = self.options
        with_totals = o.recon == "sparse" and o.channel_totals
        return dict(channel_totals=o.channel_totals, total_correlations=with_totals and o.total_correlations,
                    totals_basis=o.totals_basis if with_totals else "channels", pixel_shares=with_totals and o.pixel_shares,
                    hit_counts=with_totals and o.hit_counts, count_conditioned=with_totals and o.hit_counts,
                    count_calibrated=with_totals and o.hit_counts)

    def resume(self, run: RunDir, state: dict, config: dict) -> None:
        o = self.options
        if os.path.abspath(o.data) != config["data"]:
            print(f"jetfast train-vae: note: resuming with --data {o.data}; the run was started on {config['data']}",
                  file=sys.stderr)
        if "lr_schedule" not in config["args"]:
            o.lr_schedule = "plateau"  # runs from before the cosine schedule: their saved scheduler's kind
        self.split = load_split(run)
        self.n_used = config["n_jets_used"]
        if self.n_used > self.n_file:
            raise RunDirError(f"{o.data} has {self.n_file} jets but the run used {self.n_used}; resume with the original file")
        self.vae_config = VAEConfig.from_dict(state["vae_config"])
        self.transform = IntensityTransform.from_dict(state["transform"])
        self.training_jets = state.get("training_jets")

    def build(self, rank: int, world_size: int, device: torch.device) -> VAE:
        o = self.options
        self.device, self.world_size = device, world_size
        keys = loader_keys(self.vae_config, IMAGE_KEY)
        self.train_loader = JetLoader(o.data, o.batch_size, indices=self.split["train"], shuffle=True, seed=o.seed,
                                      num_threads=o.loader_threads, transform=None, keys=keys)
        self.val_loader = JetLoader(o.data, o.batch_size, indices=self.split["val"], shuffle=False,
                                    num_threads=o.loader_threads, transform=None, keys=keys)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise InvalidArgument(f"the training split has {len(self.split['train'])} jets: too few for {world_size} process(es)")
        self.vae_config.kl_warmup_steps = int(round(o.kl_warmup_epochs * self.steps_per_epoch))
        self.model = VAE(self.vae_config)
        return self.model

    def build_optimizer(self, model: VAE) -> torch.optim.Optimizer:
        o = self.options
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW if o.weight_decay > 0 else torch.optim.Adam
        return optimizer(params, lr=o.lr, weight_decay=o.weight_decay)

    def build_scheduler(self, optimizer: torch.optim.Optimizer, step: int):
        o = self.options
        if o.lr_schedule == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=o.lr_patience)
        # A cosine decay over the run ends it at a small step size (8 epochs on 3,200 jets: val NLL
        # 959.8 nats per jet against 975.4 with the plateau schedule). On resume the schedule
        # follows the (possibly longer) new run from the saved step.
        schedule = warmup_cosine(0, o.epochs * self.steps_per_epoch, o.min_lr_ratio)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule, last_epoch=step - 1)

    def checkpoint_extras(self) -> dict:
        extras = {"vae_config": self.vae_config.to_dict(), "transform": self.transform.to_dict()}
        if self.training_jets is not None:
            extras["training_jets"] = self.training_jets
        return extras

    def write_run_files(self, run: RunDir, world_size: int) -> None:
        run.write_config(self._config(run, world_size))
        save_split(run, self.split)

    def batches(self, epoch: int):
        self.train_loader.set_epoch(epoch)
        return self.train_loader

    def _inputs(self, batch, mirror_seed: int | None = None):
        """(encoder input (B, 3, 128, 128) transformed, the jets (B, 125, 125, 3) in GeV, their
        conditions (B, 3) or None), the jets mirrored at random when a seed is given (a mirror
        keeps a jet's pT and mass)."""
        physical = batch["X_jets"].to(self.device, non_blocking=True)  # padded, GeV
        if mirror_seed is not None:
            physical = _mirror(physical, torch.Generator().manual_seed(mirror_seed))
        conditions = batch_conditions(batch, self.vae_config)
        conditions = None if conditions is None else conditions.to(self.device)
        return self.transform.forward(physical), crop_to_image(physical), conditions

    def _hits(self, images: torch.Tensor) -> torch.Tensor | None:
        """The jets' hits per channel, which a count-conditioned decoder is trained with."""
        return SparseObservation.hit_numbers(images) if self.vae_config.count_conditioned else None

    def step(self, net, batch, step: int):
        # Mirrors drawn from (seed, step): a resumed run draws the same ones.
        x, images, conditions = self._inputs(batch, self.options.seed * 1_000_003 + step if self.options.augment else None)
        self.beta = self.model.beta_at(step)
        return self.model.loss(x, *net(x, conditions, self._hits(images)), self.beta, images=images), x.shape[0]

    def validate(self, model: VAE):
        # Validation always weighs the KL with the full beta: the objective being selected on
        # must not change during the warm-up, or the scheduler would read the ramp as a plateau.
        sums: dict[str, float] = {}
        jets = 0
        with torch.no_grad():
            for batch in self.val_loader:
                x, images, conditions = self._inputs(batch)
                terms = model.loss(x, *model(x, conditions, self._hits(images)), self.vae_config.beta, images=images)
                n = x.shape[0]
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * n
                jets += n
        return sums, jets

    def record(self, train: dict, val: dict, step: int) -> dict:
        # KL weight of the last training step (validation uses the full beta)
        return {**super().record(train, val, step), "beta": self.model.beta_at(step - 1)}

    def progress(self, terms: dict) -> dict:
        return {**super().progress(terms), "beta": f"{self.beta:.2g}"}

    def describe_start(self, run: RunDir, start_epoch: int, step: int, world_size: int) -> str:
        split = self.split
        return (f"{len(split['train'])} train / {len(split['val'])} val / {len(split['test'])} test jets, "
                f"{self.steps_per_epoch} steps per epoch x {world_size} process(es), loader backend "
                f"{self.train_loader.backend}, run directory {run.path}"
                + (f", resuming at epoch {start_epoch + 1} (step {step})" if start_epoch else ""))

    def describe_epoch(self, record: dict) -> str:
        # Every validation term the loss returns, beside the total (the KL with fewer digits).
        terms = ", ".join(f"{key[4:]} {value:{'.4g' if key == 'val_kl' else '.5g'}}" for key, value in record.items()
                          if key.startswith("val_") and key != "val_loss")
        return (f"train {record['train_loss']:.5g}  val {record['val_loss']:.5g} ({terms})  lr {record['lr']:.2g}  "
                f"{record['images_per_s']:.1f} images/s")

    def close(self) -> None:
        for loader in (getattr(self, "train_loader", None), getattr(self, "val_loader", None)):
            if loader is not None:
                loader.close()

    def _terms(self) -> list[str]:
        parts = ("hits", "energy", "total") if self.vae_config.channel_totals else ("hits", "energy")
        parts += ("count",) if self.vae_config.hit_counts else ()
        channels = [f"{c}_{part}" for c in CHANNEL_NAMES for part in parts]
        return ["loss", "recon", "kl", *(channels if self.vae_config.recon == "sparse" else [])]

    def _config(self, run: RunDir, world_size: int) -> dict:
        o = self.options
        return {
            "command": "train-vae",
            "description": "jetfast stage-1 VAE run; see README.txt for the files in this directory",
            "data": os.path.abspath(o.data),
            "n_jets_in_file": self.n_file,
            "n_jets_used": self.n_used,
            "split": {
                "seed": o.seed,
                "fractions": [1 - o.val_fraction - o.test_fraction, o.val_fraction, o.test_fraction],
                "sizes": {k: int(len(v)) for k, v in self.split.items()},
                "file": run.split_path.name,
            },
            "vae": self.vae_config.to_dict(),
            "transform": self.transform.to_dict(),
            "training": {
                "epochs": o.epochs,
                "batch_size": o.batch_size,
                "world_size": world_size,
                "steps_per_epoch": self.steps_per_epoch,
                "optimizer": "AdamW" if o.weight_decay > 0 else "Adam",
                "lr": o.lr,
                "weight_decay": o.weight_decay,
                "grad_clip": o.grad_clip,
                "lr_schedule": (f"ReduceLROnPlateau(val_loss, factor=0.5, patience={o.lr_patience})" if o.lr_schedule == "plateau"
                                else f"cosine decay per step to {o.min_lr_ratio} x lr at the last epoch"),
                "early_stopping_patience": o.patience,
                "kl_warmup_epochs": o.kl_warmup_epochs,
                "augment": "random eta and phi mirroring" if o.augment else None,
                "seed": o.seed,
                "num_threads": o.num_threads,
            },
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(o).items()},
            "versions": {"jetfast": jetfast.__version__, "torch": torch.__version__},
            "metrics": {
                "file": run.metrics_path.name,
                "keys": ["epoch", "step", *(f"{part}_{term}" for part in ("train", "val") for term in self._terms()),
                         "beta", "lr", "time_s", "images_per_s"],
                "note": "per-jet means in nats; recon = the negative log-likelihood of the image (sparse: the sum of "
                        "<channel>_hits, where the hits are, <channel>_energy, how much they hold, and with channel "
                        "totals <channel>_total, the channel's sum); train_* "
                        "average the epoch's steps (KL weight 'beta' ramping during warm-up), val_* use the full "
                        "beta; images_per_s counts training images of all processes",
            },
        }


def _sample_images(path: str, train_indices, max_jets: int, seed: int, loader_threads: int | None) -> torch.Tensor:
    """A random sample of training jets (N, 125, 125, 3) in GeV, to fit the intensity transform
    and the hit statistics on; every rank draws the same sample, so all fit the same."""
    rng = np.random.default_rng(seed)
    take = min(len(train_indices), max(1, max_jets))
    sample = rng.choice(train_indices, size=take, replace=False)
    with JetLoader(path, 256, indices=sample, shuffle=False, transform=None, keys=("X_jets",),
                   num_threads=loader_threads, rank=0, world_size=1) as loader:
        return torch.cat([crop_to_image(batch["X_jets"]) for batch in loader])


def _training_jets(path: str, train_indices) -> torch.Tensor:
    """The training jets' (y, pt, m0) (N, 3) float32, checked usable as conditions."""
    jets = read_conditions(path, np.sort(train_indices)).double().numpy()
    bad = ~np.isfinite(jets).all(1) | (jets[:, 1] <= 0) | (jets[:, 2] < 0)
    if bad.any():
        row = int(np.sort(train_indices)[np.argmax(bad)])
        y, pt, m0 = jets[np.argmax(bad)]
        raise JetFileError(f"{path}: jet {row} has y {y:g}, pt {pt:g}, m0 {m0:g}; conditioning the VAE on the "
                           "jets needs finite y, pt > 0 and m0 >= 0 GeV (train with --no-conditioning to ignore them)")
    return torch.from_numpy(jets.astype(np.float32))


def _mirror(physical: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each padded jet (B, 3, 128, 128) in eta (rows) and/or phi (columns) with probability
    1/2 each, about the image centre: the 125 x 125 image is flipped, not the padded frame."""
    flips = torch.rand(2, physical.shape[0], generator=generator) < 0.5
    end = PAD_BEFORE + IMAGE_SIZE
    physical = physical.clone()
    image = physical[:, :, PAD_BEFORE:end, PAD_BEFORE:end]
    for axis, chosen in zip((-2, -1), flips):
        if chosen.any():
            image[chosen.to(physical.device)] = image[chosen.to(physical.device)].flip(axis)
    return physical


def _warn_if_unbalanced(path: str, n_used: int) -> None:
    """--max-jets takes the first N jets; say so when that leaves the classes badly unbalanced."""
    with h5py.File(path, "r") as f:
        labels = f["y"][:n_used]
    values, counts = np.unique(labels, return_counts=True)
    if len(values) < 2 or counts.min() < 0.3 * n_used:
        share = ", ".join(f"y={v:g}: {c}" for v, c in zip(values, counts))
        print(f"jetfast train-vae: warning: the {n_used} jets used have unbalanced classes ({share}); "
              "if the file is sorted by class, use a shuffled copy or more jets", file=sys.stderr)
