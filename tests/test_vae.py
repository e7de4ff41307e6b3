"""The stage-1 VAE: model, loss, training (resume, DDP, guards) and evaluation."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from jetfast.data.transforms import IntensityTransform, crop_to_image
from jetfast.models.observation import SparseObservation
from jetfast.models.vae import VAE, VAEConfig, load_vae
from jetfast.cli import main
from jetfast.run import RunDir, load_split
from tests.commands import assert_refused, interrupt_after_first_epoch, listing, run
from tests.jetfiles import damage_chunk, jet_images, write_jet_file

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# Tiny enough that an epoch over a few dozen jets takes about a second on 2 busy cores.
# fp32: the same numbers on every CPU (``auto`` would take bf16 where it is native), so logged
# losses can be recomputed and a resumed run compared with an uninterrupted one exactly.
TINY = ["--widths", "4,8,8,8", "--latent-dim", "6", "--batch-size", "8", "--transform-jets", "40", "--no-progress",
        "--precision", "fp32"]


@pytest.fixture(autouse=True)
def _restore_determinism_flag():
    """Training switches torch to deterministic algorithms; leave other tests as they were."""
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)


def train(data, out, *extra) -> int:
    """``jetfast train-vae`` on a tiny model; the exit status."""
    return main(["train-vae", "--data", str(data), "--out", str(out), *TINY, *map(str, extra)])


@pytest.fixture(scope="module")
def jet_file(tmp_path_factory, module_seed):
    path = tmp_path_factory.mktemp("vae") / "jets.h5"
    write_jet_file(path, n=47, seed=module_seed, chunk=16)  # odd N: the last chunk and batch are partial
    return path


@pytest.fixture(scope="module")
def trained_run(jet_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "run"
    assert train(jet_file, out, "--epochs", 2, "--seed", 3) == 0
    return out


# -- model -------------------------------------------------------------------------------------
def test_default_shapes():
    model = VAE().eval()
    x = torch.randn(2, 3, 128, 128)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (2, 128)
    # The sparse observation model: per channel a hit logit and 3 x (weight logit, loc, log scale).
    assert model.decode(mu).pixels.shape == (2, 30, 128, 128) and model.decode(mu).totals is None
    x_hat, mu2, _ = model(x)
    assert x_hat.pixels.shape == (2, 30, 128, 128) and torch.equal(mu, mu2)
    assert VAE(VAEConfig(recon="mse")).decode(mu).shape == (2, 3, 128, 128)
    # eval mode decodes the posterior mean
    assert torch.equal(x_hat.pixels, model.decode(mu).pixels)
    # With channel totals: (loc, log scale) of each channel's log total.
    assert VAE(VAEConfig(channel_totals=True)).eval().decode(mu).totals.shape == (2, 3, 2)


def test_odd_configs_and_bad_shapes():
    model = VAE(VAEConfig(latent_dim=1, widths=(3, 5), image_size=128, intensity_components=1))
    assert model(torch.randn(3, 3, 128, 128))[0].pixels.shape == (3, 9, 128, 128)
    with pytest.raises(ValueError, match=r"\(B, 3, 128, 128\)"):
        model.encode(torch.randn(2, 3, 125, 125))
    with pytest.raises(ValueError, match=r"\(B, 1\)"):
        model.decode(torch.randn(2, 4))
    with pytest.raises(ValueError, match="divisible"):
        VAEConfig(widths=(4,) * 8)
    with pytest.raises(ValueError, match="recon"):
        VAEConfig(recon="l1")


@pytest.mark.parametrize("recon", ["mse", "gaussian_nll"])
def test_loss_matches_torch_distributions(recon, seed):
    torch.manual_seed(seed)
    model = VAE(VAEConfig(latent_dim=5, widths=(2, 2), recon=recon))
    with torch.no_grad():
        model.log_sigma2.copy_(torch.randn(3))
    x, x_hat = torch.randn(3, 3, 128, 128), torch.randn(3, 3, 128, 128)
    mu, logvar = torch.randn(3, 5), torch.randn(3, 5)
    beta = 0.37
    terms = model.loss(x, x_hat, mu, logvar, beta)
    posterior = torch.distributions.Normal(mu.double(), (0.5 * logvar.double()).exp())
    prior = torch.distributions.Normal(torch.zeros(3, 5, dtype=torch.float64), 1.0)
    kl = torch.distributions.kl_divergence(posterior, prior).sum(1).mean()
    # "mse" is the summed squared error: the NLL of a Gaussian of variance 1/2 without its constant.
    sigma = math.sqrt(0.5) if recon == "mse" else (0.5 * model.log_sigma2.detach().double()).exp().view(1, 3, 1, 1)
    nll = -torch.distributions.Normal(x_hat.double(), sigma).log_prob(x.double()).flatten(1).sum(1).mean()
    if recon == "mse":
        nll = nll - 0.5 * math.log(2 * math.pi * 0.5) * x[0].numel()
    torch.testing.assert_close(terms["kl"].double(), kl, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(terms["recon"].double(), nll, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(terms["loss"], terms["recon"] + beta * terms["kl"])


def test_kl_warmup():
    model = VAE(VAEConfig(latent_dim=2, widths=(2,), beta=2.0, kl_warmup_steps=4))
    assert [model.beta_at(s) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


def test_intensity_transform_roundtrip_extreme_values(seed):
    images, _ = jet_images(9, seed=seed)
    transform = IntensityTransform.fit(images)
    transform = IntensityTransform.from_dict(json.loads(json.dumps(transform.to_dict())))  # as saved in checkpoints
    images[0, 0, 0] = [757.0, 0.0, 1e4]  # huge (Tracks max of the real file and beyond)
    images[0, 124, 124] = [1e-7, 3e-3, 0.43]  # tiny, and the HCAL max
    images[1] = 0.0  # an empty jet
    physical = torch.from_numpy(images)
    back = transform.to_images(transform.to_model(physical))
    torch.testing.assert_close(back, physical, rtol=2e-6, atol=1e-6)
    assert (back[physical == 0] < 1e-6).all()


@pytest.mark.parametrize("recon", ["sparse", "mse"])
def test_loss_falls_on_tiny_dataset(recon, seed):
    torch.manual_seed(0)
    images, _ = jet_images(8, seed=seed)
    transform = IntensityTransform.fit(images)
    x = transform.to_model(torch.from_numpy(images))
    model = VAE(VAEConfig(latent_dim=8, widths=(8, 8, 16, 16), beta=0.1, recon=recon))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        terms = model.loss(x, *model(x), images=torch.from_numpy(images))
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(float(terms["loss"].detach()))
    assert losses[-1] < 0.9 * losses[0], losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 16, losses


# -- training ----------------------------------------------------------------------------------
def test_run_dir_explains_itself_and_load_vae(trained_run, jet_file):
    config = json.loads((trained_run / "config.json").read_text())
    assert config["n_jets_used"] == 47 and config["data"] == str(jet_file)
    assert config["vae"]["widths"] == [4, 8, 8, 8] and "transform" in config
    metrics = RunDir(trained_run).read_metrics()
    assert [m["epoch"] for m in metrics] == [0, 1]
    for key in ("train_loss", "train_recon", "train_kl", "val_loss", "val_recon", "val_kl", "lr", "time_s", "images_per_s"):
        assert all(math.isfinite(m[key]) for m in metrics), key
    # The default schedule: a cosine from --lr (1e-3) at the first step to 0.02 x --lr after the last.
    steps = metrics[-1]["step"]
    for m in metrics:
        assert m["lr"] == pytest.approx(1e-3 * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * m["step"] / steps))))
    assert config["training"]["lr_schedule"].startswith("cosine")
    for name in ("README.txt", "split.npz", "plots/loss.png", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (trained_run / name).is_file(), name
    split = load_split(trained_run)
    assert sorted(np.concatenate(list(split.values())).tolist()) == list(range(47))

    model, transform, cfg = load_vae(trained_run)
    assert not model.training and cfg.latent_dim == 6 and isinstance(transform, IntensityTransform)
    best_epoch = int(np.argmin([m["val_loss"] for m in metrics]))
    state = torch.load(trained_run / "checkpoints" / "best.pt", weights_only=False)
    assert state["epoch"] == best_epoch
    # The best checkpoint's model reproduces the logged validation loss at its epoch.
    assert cfg.conditioned and model.training_jets.shape == (len(split["train"]), 3)
    with h5py.File(jet_file) as f:
        images = torch.from_numpy(f["X_jets"][split["val"]])
        conditions = torch.from_numpy(np.stack([f[k][split["val"]] for k in ("y", "pt", "m0")], 1))
        np.testing.assert_array_equal(model.training_jets.numpy(),
                                      np.stack([f[k][np.sort(split["train"])] for k in ("y", "pt", "m0")], 1))
    x = transform.to_model(images)
    with torch.no_grad():  # the decoder places each jet's own number of hits (hit counts, the default)
        terms = model.loss(x, *model(x, conditions, SparseObservation.hit_numbers(images)), beta=cfg.beta, images=images)
        # Other counts than the jets' own (the head's median can be exactly theirs once trained).
        blind = model.loss(x, *model(x, conditions, SparseObservation.hit_numbers(images) + 5), beta=cfg.beta, images=images)
    assert math.isclose(float(terms["loss"]), metrics[best_epoch]["val_loss"], rel_tol=1e-4)
    assert cfg.hit_counts and cfg.count_conditioned and cfg.count_calibrated
    assert float(terms["loss"]) != float(blind["loss"])  # the counts reach the decoder

    last, _, _ = load_vae(trained_run / "checkpoints" / "last.pt", which="ignored-for-files")
    assert last.config == cfg
    with pytest.raises(FileNotFoundError, match="train-vae"):
        load_vae(trained_run, which="nope")


def test_no_hit_counts_trains_the_independent_pixels(jet_file, tmp_path):
    """``--no-hit-counts``: no count head, pixels hit independently; the logged validation loss is
    recomputed without counts, and the model samples jets."""
    out = tmp_path / "run"
    assert train(jet_file, out, "--epochs", 1, "--seed", 3, "--no-hit-counts") == 0
    model, transform, cfg = load_vae(out)
    assert not (cfg.hit_counts or cfg.count_conditioned or cfg.count_calibrated)
    assert "observation.count_log_mean" not in model.state_dict()
    split = load_split(out)
    with h5py.File(jet_file) as f:
        images = torch.from_numpy(f["X_jets"][np.sort(split["val"])])
        conditions = torch.from_numpy(np.stack([f[k][np.sort(split["val"])] for k in ("y", "pt", "m0")], 1))
    x = transform.to_model(images)
    with torch.no_grad():
        terms = model.loss(x, *model(x, conditions), beta=cfg.beta, images=images)
    metrics = RunDir(out).read_metrics()
    assert math.isclose(float(terms["loss"]), metrics[-1]["val_loss"], rel_tol=1e-4) and "tracks_count" not in terms
    jets = model.images(torch.randn(3, cfg.latent_dim), transform, conditions[:3], seed=1)
    assert jets.shape == (3, 125, 125, 3) and torch.isfinite(jets).all()


def test_plateau_schedule_and_runs_from_before_the_cosine_resume_with_theirs(jet_file, tmp_path):
    """``--lr-schedule plateau`` keeps --lr until the validation loss stalls; a run whose config
    predates the option (no ``lr_schedule``) resumes with the plateau schedule its checkpoint holds."""
    out = tmp_path / "run"
    assert train(jet_file, out, "--epochs", 1, "--seed", 3, "--lr-schedule", "plateau") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["lr_schedule"].startswith("ReduceLROnPlateau")
    del config["args"]["lr_schedule"]
    (out / "config.json").write_text(json.dumps(config))
    assert train(jet_file, out, "--epochs", 2, "--seed", 3, "--resume") == 0
    metrics = RunDir(out).read_metrics()
    assert [m["lr"] for m in metrics] == [1e-3, 1e-3]


def test_bf16_autocast_trains_and_is_recorded(jet_file, trained_run, tmp_path):
    """bf16 autocast (weights and losses stay fp32) learns like fp32 and says so in its metrics."""
    out = tmp_path / "run"
    assert train(jet_file, out, "--epochs", 2, "--seed", 3, "--precision", "bf16") == 0
    bf16 = RunDir(out).read_metrics()
    fp32 = RunDir(trained_run).read_metrics()
    assert [m["precision"] for m in bf16] == ["bf16"] * 2 and [m["precision"] for m in fp32] == ["fp32"] * 2
    assert bf16[1]["val_loss"] < bf16[0]["val_loss"]
    assert bf16[1]["val_loss"] == pytest.approx(fp32[1]["val_loss"], rel=0.05)
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())


def test_resume_matches_uninterrupted(jet_file, trained_run, tmp_path, monkeypatch):
    """Interrupted after its first epoch and resumed, a run ends as the uninterrupted one: the same
    losses, learning rates (the cosine schedule's state is in the checkpoint) and weights."""
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_after_first_epoch(patch)
        assert train(jet_file, out, "--epochs", 2, "--seed", 3) == 130
    assert train(jet_file, out, "--epochs", 2, "--seed", 3, "--resume") == 0
    resumed = RunDir(out).read_metrics()
    straight = RunDir(trained_run).read_metrics()
    assert len(resumed) == len(straight) == 2
    for key in ("train_loss", "train_recon", "train_kl", "val_loss", "lr", "step"):
        assert resumed[1][key] == pytest.approx(straight[1][key], rel=1e-6, abs=0), key
    a = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["model"]
    b = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=False)["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


def test_refuses_existing_out_and_bad_file(jet_file, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert train(jet_file, out, "--epochs", 1) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"

    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f["X_jets"] = np.zeros((5, 64, 64, 3), np.float32)
        f["y"] = np.zeros(5, np.float32)
    assert train(bad, tmp_path / "run_bad", "--epochs", 1) == 2
    err = capsys.readouterr().err
    assert "(5, 64, 64, 3)" in err and "(N, 125, 125, 3)" in err
    assert train(tmp_path / "missing.h5", tmp_path / "run_missing", "--epochs", 1) == 2
    assert "not found" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(jet_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    steps_per_epoch = math.ceil(len(load_split_for(jet_file)["train"]) / 8)
    calls = {"n": 0}
    real_loss = VAE.loss

    def poisoned(self, x, x_hat, mu, logvar, beta=None, images=None):
        terms = real_loss(self, x, x_hat, mu, logvar, beta, images)
        if self.training:
            calls["n"] += 1
            if calls["n"] == steps_per_epoch + 2:  # third step of the second epoch
                terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(VAE, "loss", poisoned)
    assert train(jet_file, out, "--epochs", 3) == 2
    err = capsys.readouterr().err
    assert "diverged" in err and f"step {steps_per_epoch + 1}" in err and "checkpoint was kept" in err
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert state["epoch"] == 0 and state["step"] == steps_per_epoch
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert not list((out / "checkpoints").glob("*.tmp"))


@pytest.fixture(scope="module")
def nan_jet_file(tmp_path_factory, module_seed):
    """A file whose training split holds one jet with a NaN pixel, outside the transform's fitting sample."""
    from jetfast.run import make_split

    n, seed = 47, 0
    train = make_split(n, seed=seed)["train"]
    fitted = np.random.default_rng(seed).choice(train, size=10, replace=False)
    bad = int(np.setdiff1d(train, fitted)[0])
    images, labels = jet_images(n, seed=module_seed)
    images[bad, 60, 61, 1] = np.nan
    path = tmp_path_factory.mktemp("vae_nan") / "jets.h5"
    write_jet_file(path, images=images, labels=labels, chunk=16)
    return path, bad


def test_nan_pixels_are_named(nan_jet_file, tmp_path, capsys):
    path, bad = nan_jet_file
    assert train(path, tmp_path / "run", "--epochs", 1, "--transform-jets", 10) == 2
    err = capsys.readouterr().err
    assert f"jet(s) {bad} have NaN" in err, err
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_unusable_conditions_are_named(tmp_path, capsys, module_seed):
    images, labels = jet_images(30, seed=module_seed)
    path = tmp_path / "jets.h5"
    write_jet_file(path, images=images, labels=labels)
    from jetfast.run import make_split

    bad = int(np.sort(make_split(30, seed=0)["train"])[3])
    with h5py.File(path, "r+") as f:
        f["pt"][bad] = 0.0
    assert train(path, tmp_path / "run", "--epochs", 1) == 2
    err = capsys.readouterr().err
    assert f"jet {bad} has y" in err and "pt 0," in err and "--no-conditioning" in err, err
    # Without conditioning the file trains.
    assert train(path, tmp_path / "run2", "--epochs", 1, "--no-conditioning") == 0
    assert not json.loads((tmp_path / "run2" / "config.json").read_text())["vae"]["conditioned"]


def test_ddp_ranks_stop_together_on_nan(nan_jet_file, tmp_path):
    path, bad = nan_jet_file
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "jetfast.cli",
           "train-vae", "--data", str(path), "--out", str(tmp_path / "run"), *TINY, "--transform-jets", "10", "--epochs", "1",
           "--num-threads", "1"]
    # The rank whose batch holds the jet refuses it; the clean one must not wait forever in backward:
    # the timeout fails the test.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150, cwd=REPO)
    assert proc.returncode != 0
    assert f"jet(s) {bad} have NaN" in proc.stderr, proc.stderr[-3000:]


REFUSED_TRAINING = {
    "latent-dim 0": (["--latent-dim", "0"], "latent_dim must be >= 1"),
    "val-fraction 1.5": (["--val-fraction", "1.5"], "--val-fraction and --test-fraction must be >= 0"),
    "lr nan": (["--lr", "nan"], "a finite --lr > 0; got 1, 8, nan"),
    "max-jets 0": (["--max-jets", "0"], "--max-jets must be >= 1"),
    "weight-decay -1": (["--weight-decay", "-1"], "--weight-decay >= 0"),
    "min-lr-ratio 2": (["--min-lr-ratio", "2"], "--min-lr-ratio in [0, 1]"),
}


@pytest.mark.parametrize("case", REFUSED_TRAINING)
def test_refused_options_create_nothing(jet_file, tmp_path, capsys, case):
    extra, message = REFUSED_TRAINING[case]
    argv = ["train-vae", "--data", jet_file, "--out", tmp_path / "run", *TINY, "--epochs", 1, *extra]
    assert_refused(*run(argv, capsys), "train-vae", message)
    assert listing(tmp_path) == {}


@pytest.mark.parametrize("damage", ["NaN pixels", "corrupt chunk"])
def test_a_run_that_failed_before_its_first_checkpoint_is_simply_started_again(jet_file, nan_jet_file, tmp_path,
                                                                               capsys, damage):
    if damage == "NaN pixels":
        bad, message, rerun = nan_jet_file[0], f"jet(s) {nan_jet_file[1]} have NaN", []
    else:
        bad, message, rerun = tmp_path / "corrupt.h5", "chunk 1", ["--resume"]
        shutil.copy(jet_file, bad)
        damage_chunk(bad, 1, "start")
    out = tmp_path / "run"
    argv = ["train-vae", "--out", out, *TINY, "--epochs", 1]
    assert_refused(*run([*argv, "--data", bad], capsys), "train-vae", message)
    assert not (out / "checkpoints" / "last.pt").exists()
    # The corrected rerun needs no --overwrite, and with --resume it starts as well (nothing to resume).
    status, err = run([*argv, "--data", jet_file, *rerun], capsys)
    assert status == 0, err
    assert "stopped before its first checkpoint" in err and ("nothing to resume" in err) == bool(rerun), err
    assert (out / "checkpoints" / "last.pt").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) == 1
    # A run with a checkpoint is never replaced without being asked.
    assert_refused(*run([*argv, "--data", jet_file], capsys), "train-vae", "--resume", "--overwrite")


def load_split_for(jet_file):
    from jetfast.run import make_split

    with h5py.File(jet_file) as f:
        return make_split(len(f["y"]), seed=0)


def test_ddp_two_processes_keep_ranks_equal(jet_file, tmp_path):
    out, ranks = tmp_path / "run", tmp_path / "ranks"
    env = {**os.environ, "JETFAST_RANK_STATE_DIR": str(ranks), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "jetfast.cli",
           "train-vae", "--data", str(jet_file), "--out", str(out), *TINY, "--epochs", "1", "--num-threads", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = torch.load(ranks / "rank0.pt", weights_only=True)
    rank1 = torch.load(ranks / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["world_size"] == 2
    # Each rank reads half of the training jets: half the steps of a single process.
    assert config["training"]["steps_per_epoch"] == math.ceil((len(load_split(out)["train"]) // 2) / 8)
    assert torch.equal(torch.load(out / "checkpoints" / "last.pt", weights_only=False)["model"]["to_mu.weight"],
                       rank0["to_mu.weight"])


@pytest.mark.parametrize("command, words", [
    ("train-vae", ("--data", "--out", "--resume", "--overwrite", "--max-jets", "--beta", "--epochs")),
    ("evaluate-vae", ("RUN_DIR", "--data", "--max-jets", "--out")),
])
def test_cli_help(command, words):
    proc = subprocess.run([PYTHON, "-m", "jetfast.cli", command, "--help"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert all(w in proc.stdout for w in words), proc.stdout
    proc = subprocess.run([PYTHON, "-m", "jetfast.cli", command, "--data"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2 and "usage:" in proc.stderr


@pytest.mark.parametrize("command", ["train-vae", "evaluate-vae"])
def test_jetfast_cli_lists_vae_commands(command):
    proc = subprocess.run([PYTHON, "-m", "jetfast.cli", command, "--help"], capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"jetfast {command}" in proc.stdout and "--data" in proc.stdout


# -- evaluation --------------------------------------------------------------------------------
def test_gaussian_ssim_against_numpy_reference(rng):
    from scipy.ndimage import correlate1d

    from jetfast.evaluate.vae import gaussian_ssim

    x = rng.normal(size=(2, 3, 23, 31))
    y = x + rng.normal(scale=0.5, size=x.shape)
    data_range = np.array([4.0, 7.0, 9.0])
    offsets = np.arange(-5, 6)
    g = np.exp(-(offsets**2) / (2 * 1.5**2))
    g /= g.sum()

    def blur(t):  # valid region only, like the reference implementation's border crop
        return correlate1d(correlate1d(t, g, axis=-1), g, axis=-2)[..., 5:-5, 5:-5]

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = ((0.01 * data_range) ** 2)[None, :, None, None], ((0.03 * data_range) ** 2)[None, :, None, None]
    expected = (((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean(axis=(2, 3))
    got = gaussian_ssim(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(data_range))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)
    same = gaussian_ssim(torch.from_numpy(x), torch.from_numpy(x), torch.from_numpy(data_range))
    np.testing.assert_allclose(same.numpy(), 1.0, rtol=1e-12)


def test_evaluate_vae_writes_metrics_and_plots(trained_run, jet_file, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate-vae", str(trained_run), "--data", str(jet_file), "--out", str(out), "--no-progress",
                 "--show", "3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    test = load_split(trained_run)["test"]
    assert metrics["n_test_jets"] == len(test) and metrics["split"] == "test"
    for channel in ("Tracks", "ECAL", "HCAL"):
        entry = metrics["channels"][channel]
        for key in ("mse_gev2", "total_energy_rel_error", "psnr_db", "ssim", "data_range_transformed"):
            assert key in entry, (channel, key)
        for key in ("mean", "median", "q05", "q95"):
            assert math.isfinite(entry["total_energy_rel_error"][key])
    assert {"qg_auc", "protocol", "pca_explained_variance_ratio"} <= metrics["latent"].keys()
    assert {"definition", "y=0", "y=1"} <= metrics["anomaly_score"].keys()
    for png in ("reconstructions.png", "latent_pca.png", "anomaly_score.png"):
        assert (out / png).stat().st_size > 5000, png

    # Independent check of the physical-unit numbers: recompute from the file and the model.
    model, transform, _ = load_vae(trained_run)
    with h5py.File(jet_file) as f:
        true = torch.from_numpy(f["X_jets"][test]).double()
        conditions = torch.from_numpy(np.stack([f[k][test] for k in ("y", "pt", "m0")], 1))
    with torch.no_grad():
        mu, _ = model.encode(transform.to_model(true.float()), conditions)
        reco = model.images(mu, transform, conditions, mode="sample", seed=0).double()  # evaluate-vae's default seed
    mse = ((reco - true) ** 2).mean(dim=(0, 1, 2))
    for c, channel in enumerate(("Tracks", "ECAL", "HCAL")):
        assert metrics["channels"][channel]["mse_gev2"] == pytest.approx(float(mse[c]), rel=1e-4)
        rel = ((reco[..., c].sum((1, 2)) - true[..., c].sum((1, 2))) / true[..., c].sum((1, 2))).numpy()
        assert metrics["channels"][channel]["total_energy_rel_error"]["median"] == pytest.approx(np.median(rel), rel=1e-4)


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("labels", [[1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 1]])
def test_anomaly_plot_draws_the_classes_present(labels, rng, tmp_path):
    """A small test split may hold one class only: the plot draws what is there, with no empty
    density (0/0) behind it."""
    from jetfast.evaluate.vae import _plot_anomaly

    _plot_anomaly(rng.lognormal(-3, 1, 4), np.array(labels), tmp_path / "anomaly_score.png")
    assert (tmp_path / "anomaly_score.png").stat().st_size > 5000


def test_evaluate_vae_bad_run_dir(tmp_path, capsys):
    assert main(["evaluate-vae", str(tmp_path)]) == 2
    assert "run directory" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--batch-size", "0"], ["--show", "0"]])
def test_refused_evaluate_vae_creates_nothing(trained_run, tmp_path, capsys, extra):
    argv = ["evaluate-vae", trained_run, "--out", tmp_path / "eval", "--no-progress", *extra]
    assert_refused(*run(argv, capsys), "evaluate-vae", "need --batch-size >= 1 and --show >= 1")
    assert listing(tmp_path) == {}
