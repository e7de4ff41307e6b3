"""`jetfast fit-bins` and `jetfast encode` on a tiny trained VAE run."""

import json
import os

import h5py
import numpy as np
import pytest
import torch

from jetfast import _ext, bins
from jetfast.cli import main
from jetfast.models.vae import load_vae
from jetfast.run import RunDir, load_split
from tests.commands import assert_refused, listing, run
from tests.jetfiles import damage_chunk, write_jet_file

pytestmark = pytest.mark.skipif(not _ext.HAS_NATIVE, reason="jetfast._C is not built")

NUM_BINS = 8
LATENT_DIM = 5


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, module_seed):
    """A one-epoch VAE on 45 synthetic jets: (run_dir, jet_file)."""
    root = tmp_path_factory.mktemp("encode")
    data = root / "jets.h5"
    write_jet_file(data, n=45, seed=module_seed, chunk=16)
    assert main([
        "train-vae", "--data", str(data), "--out", str(root / "run"), "--widths", "4,8,8,8", "--latent-dim",
        str(LATENT_DIM), "--batch-size", "16", "--transform-jets", "30", "--epochs", "1", "--no-progress",
    ]) == 0
    return root / "run", data


@pytest.fixture(scope="module")
def fitted_run(trained_run):
    run_dir, data = trained_run
    assert main(["fit-bins", str(run_dir), "--num-bins", str(NUM_BINS), "--batch-size", "16", "--no-progress"]) == 0
    return run_dir, data


def direct_latents(run_dir, data, indices, posterior_std: bool = False):
    """mu of the given jets, read with h5py and encoded in one batch (independent of JetLoader);
    with ``posterior_std``, (mu, the posterior's widths)."""
    model, transform, _ = load_vae(run_dir)
    with h5py.File(data, "r") as handle:
        images = handle["X_jets"][np.sort(indices)]
        jets = torch.from_numpy(np.stack([handle[key][np.sort(indices)] for key in ("y", "pt", "m0")], axis=1))
    with torch.no_grad():
        mu, logvar = model.encode(transform.to_model(torch.from_numpy(images)), jets)
    return (mu.numpy(), np.exp(0.5 * logvar.double().numpy())) if posterior_std else mu.numpy()


def reference_codes(mu: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest center by brute force, and how far each value is from a bin edge."""
    distance = np.abs(mu.astype(np.float64)[:, :, None] - centers.astype(np.float64)[None])
    codes = distance.argmin(axis=2)
    midpoints = (centers[:, 1:].astype(np.float64) + centers[:, :-1]) / 2
    to_edge = np.abs(mu.astype(np.float64)[:, :, None] - midpoints[None]).min(axis=2)
    return codes, to_edge


def test_fit_bins_writes_centers_and_report(fitted_run):
    run_dir, data = fitted_run
    train = load_split(run_dir)["train"]
    centers, metadata = bins.load_bins(run_dir)
    assert centers.shape == (LATENT_DIM, NUM_BINS) and centers.dtype == np.float32
    assert np.all(np.diff(centers, axis=1) >= 0)
    assert metadata["method"] == "lloyd1d" and metadata["num_bins"] == NUM_BINS
    assert metadata["num_vectors"] == len(train) and metadata["inertia"].shape == (LATENT_DIM,)

    # The same fit on the training latents computed here, without the loader.
    mu = direct_latents(run_dir, data, train)
    np.testing.assert_allclose(centers, bins.fit_bins(mu, NUM_BINS), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(metadata["inertia"], bins.inertia(mu, centers), rtol=1e-3, atol=1e-9)

    report = json.loads((run_dir / "bins_report.json").read_text())
    assert report["num_vectors"] == len(train) and report["method"] == "lloyd1d"
    latent = report["latent_error"]
    expected_rms = np.sqrt(bins.inertia(mu, centers) / len(train))
    np.testing.assert_allclose(latent["rms"], expected_rms, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(latent["relative_rms"], expected_rms / mu.astype(np.float64).std(axis=0), rtol=1e-3)
    images = report["image_change"]
    assert images["jets"] == len(train)
    for key in ("mse_model", "mse_gev2", "relative_mse"):
        assert set(images[key]) == {"tracks", "ecal", "hcal"}
        assert all(np.isfinite(v) and v >= 0 for v in images[key].values())
    assert not list(run_dir.glob("*.tmp"))


def test_encode_writes_the_codes_of_every_jet(fitted_run, tmp_path):
    run_dir, data = fitted_run
    out = tmp_path / "codes.h5"
    assert main(["encode", str(run_dir), "--out", str(out), "--batch-size", "7", "--no-progress"]) == 0
    centers, _ = bins.load_bins(run_dir)
    split = load_split(run_dir)
    with h5py.File(data, "r") as handle:
        n, labels, pt, m0 = len(handle["y"]), handle["y"][...], handle["pt"][...], handle["m0"][...]
    with h5py.File(out, "r") as handle:
        assert set(handle) == {"codes", "y", "split", "index", "centers", "posterior_std", "pt", "m0"}
        # The generator-level kinematics travel with the codes, for the Transformer's conditioning.
        np.testing.assert_array_equal(handle["pt"][...], pt)
        np.testing.assert_array_equal(handle["m0"][...], m0)
        codes, y, split_of_row, index, std = (handle[k][...] for k in ("codes", "y", "split", "index", "posterior_std"))
        assert handle.attrs["num_bins"] == NUM_BINS and handle.attrs["latent_dim"] == LATENT_DIM
        assert handle.attrs["data"] == os.path.abspath(data)
        np.testing.assert_array_equal(handle["centers"][...], centers)
    assert codes.shape == (n, LATENT_DIM) and codes.dtype == np.uint8
    assert y.dtype == np.float32 and split_of_row.dtype == np.uint8 and index.dtype == np.int64
    np.testing.assert_array_equal(index, np.arange(n))
    np.testing.assert_array_equal(y, labels)
    for value, name in enumerate(("train", "val", "test")):
        np.testing.assert_array_equal(np.flatnonzero(split_of_row == value), np.sort(split[name]))

    mu, expected_std = direct_latents(run_dir, data, index, posterior_std=True)
    # The posterior's width travels with the codes (float16: three digits), for train-gpt's draws.
    assert std.shape == codes.shape and std.dtype == np.float16
    np.testing.assert_allclose(std, expected_std, rtol=2e-3)
    expected, to_edge = reference_codes(mu, centers)
    clear = to_edge > 1e-4  # a value within rounding of a bin edge may go either way
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(codes[clear], expected[clear])

    # The Transformer's reader accepts the file.
    from jetfast.latent.codes import read_codes

    read = read_codes(out)
    assert read["codes"].shape == (n, LATENT_DIM) and read["posterior_std"].dtype == np.float32
    report = json.loads((run_dir / "encode_report.json").read_text())
    assert report["num_jets"] == n and len(report["latent_error"]["relative_rms"]) == LATENT_DIM


def test_encode_writes_a_tmp_file_then_renames_it(fitted_run, tmp_path, monkeypatch):
    run_dir, _ = fitted_run
    out = tmp_path / "codes.h5"
    out.write_text("an older codes file")
    assert main(["encode", str(run_dir), "--out", str(out), "--no-progress"]) == 2  # no --overwrite

    import jetfast.latent.codes

    seen = []
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) != str(out):  # os.replace is global: let the report's own rename through
            return real_replace(src, dst)
        # At the rename the complete file is the .tmp and the old file is still in place.
        with h5py.File(src, "r") as handle:
            seen.append((str(src), str(dst), handle["codes"].shape))
        assert out.read_text() == "an older codes file"
        real_replace(src, dst)

    monkeypatch.setattr(jetfast.latent.codes.os, "replace", replace)
    assert main(["encode", str(run_dir), "--out", str(out), "--overwrite", "--batch-size", "16", "--no-progress"]) == 0
    assert seen == [(str(out) + ".tmp", str(out), (45, LATENT_DIM))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.h5"]


def test_encode_failing_midway_leaves_no_file(fitted_run, tmp_path, monkeypatch):
    run_dir, _ = fitted_run
    import jetfast.ops

    calls = []
    real_quantize = jetfast.ops.quantize

    def failing_quantize(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure in the second batch")
        return real_quantize(*args, **kwargs)

    monkeypatch.setattr(jetfast.ops, "quantize", failing_quantize)
    out = tmp_path / "codes.h5"
    with pytest.raises(RuntimeError, match="simulated"):
        main(["encode", str(run_dir), "--out", str(out), "--batch-size", "16", "--no-progress"])
    assert list(tmp_path.iterdir()) == []


def test_clear_errors(fitted_run, tmp_path, capsys):
    run_dir, data = fitted_run
    # More bins than training jets.
    assert main(["fit-bins", str(run_dir), "--num-bins", "300", "--no-progress"]) == 2
    assert "fewer than --num-bins 300" in capsys.readouterr().err
    # Not a run directory.
    assert main(["fit-bins", str(tmp_path), "--data", str(data), "--no-progress"]) == 2
    assert "split.npz" in capsys.readouterr().err
    # Bins that do not match the VAE's latent dimension.
    fake = tmp_path / "run"
    fake.mkdir()
    for name in ("config.json", "split.npz"):
        (fake / name).write_bytes((run_dir / name).read_bytes())
    (fake / "checkpoints").mkdir()
    (fake / "checkpoints" / "best.pt").write_bytes((run_dir / "checkpoints" / "best.pt").read_bytes())
    bins.save_bins(fake / "bins.npz", np.zeros((LATENT_DIM + 1, NUM_BINS), np.float32))
    assert main(["encode", str(fake), "--no-progress"]) == 2
    assert "refit the bins" in capsys.readouterr().err
    assert not (fake / "codes.h5").exists()


@pytest.mark.parametrize("damage", ["corrupt chunk", "NaN pixels"])
def test_encode_refuses_damaged_jets_in_one_line_and_leaves_nothing(fitted_run, tmp_path, capsys, damage):
    run_dir, data = fitted_run
    bad = tmp_path / "bad.h5"
    with h5py.File(data, "r") as f:
        images, labels = f["X_jets"][()], f["y"][()]
    if damage == "NaN pixels":
        images[20, 60, 60, 2] = np.nan
    write_jet_file(bad, images=images, labels=labels, chunk=16)
    if damage == "corrupt chunk":
        damage_chunk(bad, 1, "start")
    before = listing(tmp_path)
    argv = ["encode", run_dir, "--data", bad, "--out", tmp_path / "codes.h5", "--no-progress"]
    assert_refused(*run(argv, capsys), "encode", "bad.h5", "chunk 1" if damage == "corrupt chunk" else "jet(s) 20 have NaN")
    assert listing(tmp_path) == before


@pytest.fixture(scope="module")
def run_codes(fitted_run, tmp_path_factory):
    """The fitted run and the codes of its jets, encoded once for the train-gpt tests (read only)."""
    run_dir, _ = fitted_run
    codes = tmp_path_factory.mktemp("codes") / "codes.h5"
    assert main(["encode", str(run_dir), "--out", str(codes), "--batch-size", "16", "--no-progress"]) == 0
    return run_dir, codes


# A Transformer small enough for three epochs in seconds.
TINY_GPT = ["--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--batch-size", "8", "--epochs", "3", "--no-progress"]


def best_epoch(out) -> int:
    return torch.load(out / "checkpoints" / "best.pt", weights_only=False)["epoch"]


def test_train_gpt_selects_the_epoch_whose_generated_jets_are_closest(run_codes, tmp_path):
    """On a VAE run's own codes, train-gpt decodes jets generated for the validation jets every
    epoch and keeps as best the epoch where they are closest to the real ones (not the lowest loss);
    with --select loss it keeps the lowest loss and measures nothing."""
    run_dir, codes = run_codes
    for select in ("fidelity", "loss"):
        out = tmp_path / select
        assert main(["train-gpt", str(run_dir), "--codes", str(codes), "--out", str(out), "--select", select,
                     *TINY_GPT, "--num-threads", "1"]) == 0
        config = json.loads((out / "config.json").read_text())
        assert config["select"]["by"] == select
        metrics = RunDir(out).read_metrics()
        followed = [m["val_fidelity" if select == "fidelity" else "val_loss"] for m in metrics]
        assert ("val_fidelity" in metrics[0]) == (select == "fidelity")
        assert best_epoch(out) == int(np.argmin(followed)), followed
        assert all(np.isfinite(followed)) and min(followed) >= 0


def test_the_best_checkpoint_follows_the_generated_jets_not_the_loss(run_codes, tmp_path, monkeypatch):
    """Whatever the losses do, best.pt is the epoch of the lowest generated-jet distance."""
    from jetfast.train import fidelity

    run_dir, codes = run_codes
    scores = iter([0.3, 0.1, 0.2])
    monkeypatch.setattr(fidelity.SampleFidelity, "__call__", lambda self, gpt: next(scores))
    out = tmp_path / "gpt"
    assert main(["train-gpt", str(run_dir), "--codes", str(codes), "--out", str(out), *TINY_GPT]) == 0
    assert [m["val_fidelity"] for m in RunDir(out).read_metrics()] == [0.3, 0.1, 0.2]
    assert best_epoch(out) == 1


def test_only_rank_0_measures_the_generated_jets(run_codes, tmp_path, monkeypatch):
    """Under torchrun every rank would generate and decode the same validation jets: rank 0 does,
    and the others take its score."""
    from types import SimpleNamespace

    from jetfast.train import fidelity, gpt

    run_dir, codes = run_codes

    def measured(self, gpt):
        raise AssertionError("a rank other than 0 generated the validation jets")

    monkeypatch.setattr(fidelity.SampleFidelity, "__call__", measured)
    shared = iter([0.3, 0.1, 0.2])  # what rank 0 would send
    # The GPT stage as rank 1 sees it (the training loop itself stays rank 0, which writes the run).
    monkeypatch.setattr(gpt, "distributed", SimpleNamespace(is_main=lambda: False,
                                                            broadcast_from_main=lambda value: next(shared)))
    out = tmp_path / "gpt"
    assert main(["train-gpt", str(run_dir), "--codes", str(codes), "--out", str(out), *TINY_GPT]) == 0
    assert [m["val_fidelity"] for m in RunDir(out).read_metrics()] == [0.3, 0.1, 0.2]
    assert best_epoch(out) == 1


@pytest.mark.slow
def test_train_gpt_selects_by_generated_jets_under_torchrun(run_codes, tmp_path):
    """Two processes (gloo) with --select fidelity: rank 0 measures, both ranks follow its score to
    the same best epoch, and the run ends (no rank waits forever)."""
    import subprocess
    import sys
    from pathlib import Path

    run_dir, codes = run_codes
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = tmp_path / "gpt"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "jetfast.cli",
         "train-gpt", str(run_dir), "--codes", str(codes), "--out", str(out), *TINY_GPT, "--epochs", "2",
         "--select", "fidelity"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = RunDir(out).read_metrics()
    assert json.loads((out / "config.json").read_text())["world_size"] == 2 and len(metrics) == 2
    followed = [m["val_fidelity"] for m in metrics]
    assert all(np.isfinite(followed))
    assert best_epoch(out) == int(np.argmin(followed))
