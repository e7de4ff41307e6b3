"""`jetfast generate`: layout, exact count, resume after a kill, torchrun shards."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from jetfast.data.transforms import IntensityTransform
from jetfast.errors import InvalidArgument
from jetfast.generation import writer
from jetfast.generation.writer import JetGenerator, generate_file
from jetfast.models.gpt import GPT, GPTConfig
from jetfast.models.vae import VAE, VAEConfig
from jetfast.run import save_checkpoint
from tests.commands import assert_refused, listing, run

LATENT, BINS = 16, 32
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A small but complete trained-run layout (weights untrained: generation mechanics only)."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    vae_config = VAEConfig(latent_dim=LATENT, widths=(4, 8, 8, 8))
    transform = IntensityTransform(scale=(1.0, 0.5, 0.02), mean=(0.01, 0.02, 0.03), std=(0.2, 0.3, 0.4))
    save_checkpoint(
        {"model": VAE(vae_config).state_dict(), "vae_config": vae_config.to_dict(), "transform": transform.to_dict()},
        run / "checkpoints" / "best.pt",
    )
    centers = np.sort(np.random.default_rng(0).normal(size=(LATENT, BINS)).astype(np.float32), axis=1)
    np.savez(run / "bins.npz", centers=centers)
    gpt_config = GPTConfig(vocab_size=BINS, seq_len=LATENT, d_model=32, n_heads=2, n_layers=1)
    save_checkpoint({"model": GPT(gpt_config).state_dict(), "config": asdict(gpt_config)}, run / "gpt" / "checkpoints" / "best.pt")
    return run


def read(path):
    with h5py.File(path, "r") as f:
        return {key: f[key][()] for key in ("X_jets", "y", "pt", "m0")}


def test_writes_exactly_n_jets_in_the_input_layout(run_dir, tmp_path, monkeypatch):
    out = generate_file(run_dir, 70, tmp_path / "gen.h5", batch_size=32, seed=3, progress=False)
    with h5py.File(out, "r") as f:
        assert f["X_jets"].shape == (70, 125, 125, 3) and f["X_jets"].dtype == np.float32
        assert f["X_jets"].compression == "lzf" and f["X_jets"].chunks[0] == 32
        for key in ("y", "pt", "m0"):
            assert f[key].shape == (70,) and f[key].dtype == np.float32
        assert "blocks_done" not in f
        images = f["X_jets"][()]
    assert np.isfinite(images).all() and images.min() >= 0 and (images > 0).any()
    # Sampled from the sparse observation model: most pixels empty, HCAL constant on its 5x5 towers.
    assert (images == 0).mean() > 0.5
    towers = images[..., 2].reshape(70, 25, 5, 25, 5)
    assert np.array_equal(towers, np.broadcast_to(towers[:, :, :1, :, :1], towers.shape))
    assert not (tmp_path / "gen.h5.partial").exists()
    # Same seed, another block size: the same jets (codes and pixels depend on (seed, block, jet)).
    again = read(generate_file(run_dir, 70, tmp_path / "again.h5", batch_size=32, seed=3, progress=False))
    np.testing.assert_array_equal(again["X_jets"], images)
    # Decoded a few jets at a time (a block of 10,000 jets is decoded in slices): the same jets, up to
    # the convolutions' rounding, which depends on how many jets they see at once (carried on through
    # an intensity's exponent and share: up to 2e-5 relative in the decoder's own test).
    monkeypatch.setattr(writer, "DECODE_BATCH", 5)
    sliced = read(generate_file(run_dir, 70, tmp_path / "sliced.h5", batch_size=32, seed=3, progress=False))
    np.testing.assert_array_equal(sliced["X_jets"] > 0, images > 0)
    np.testing.assert_allclose(sliced["X_jets"], images, rtol=1e-4, atol=1e-6)
    monkeypatch.undo()
    other = read(generate_file(run_dir, 70, tmp_path / "other.h5", batch_size=32, seed=4, progress=False))
    assert not np.array_equal(other["X_jets"], images)
    # The expected image instead of a draw: smooth and positive everywhere, still in towers.
    mean = read(generate_file(run_dir, 6, tmp_path / "mean.h5", batch_size=4, seed=3, decode="mean", progress=False))
    assert (mean["X_jets"] > 0).all()
    with pytest.raises(ValueError, match="decode"):
        generate_file(run_dir, 6, tmp_path / "bad.h5", decode="median", progress=False)


def test_class_choice_sets_labels(run_dir, tmp_path):
    quark = read(generate_file(run_dir, 5, tmp_path / "q.h5", cls="quark", batch_size=4, progress=False))
    assert (quark["y"] == 1).all()
    mix = read(generate_file(run_dir, 64, tmp_path / "m.h5", cls="mix", batch_size=64, progress=False))
    assert set(np.unique(mix["y"])) == {0.0, 1.0}


def test_refuses_to_clobber_and_checks_arguments(run_dir, tmp_path):
    out = generate_file(run_dir, 3, tmp_path / "a.h5", progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_file(run_dir, 3, out, progress=False)
    with pytest.raises(ValueError, match="positive"):
        generate_file(run_dir, 0, tmp_path / "b.h5", progress=False)
    with pytest.raises(ValueError, match="cls"):
        generate_file(run_dir, 3, tmp_path / "b.h5", cls="top", progress=False)
    import shutil

    shutil.copytree(run_dir / "checkpoints", tmp_path / "no_bins" / "checkpoints")
    with pytest.raises(FileNotFoundError, match="fit-bins"):
        JetGenerator(tmp_path / "no_bins")
    with pytest.raises(FileNotFoundError, match="train-vae"):
        JetGenerator(tmp_path)
    # A partial written with other settings is not silently continued.
    partial = tmp_path / "c.h5.partial"
    from jetfast.generation.writer import _create_partial

    _create_partial(partial, 3, {"seed": 99}, ()).close()
    with pytest.raises(ValueError, match="other settings"):
        generate_file(run_dir, 3, tmp_path / "c.h5", resume=True, progress=False)
    with pytest.raises(FileExistsError, match="resume"):
        generate_file(run_dir, 3, tmp_path / "c.h5", progress=False)


REFUSED_GENERATE = {
    "temperature 0": (["--temperature", "0"], "temperature must be > 0"),
    "temperature nan": (["--temperature", "nan"], "temperature must be > 0"),
    "top-p 0": (["--top-p", "0"], "top_p must be in (0, 1]"),
    "top-p 2": (["--top-p", "2"], "top_p must be in (0, 1]"),
    "top-k 0": (["--top-k", "0"], "top_k must be an int in [1, 32]"),
    "top-k 100000": (["--top-k", "100000"], "top_k must be an int in [1, 32]"),
    "n -5": (["--n", "-5"], "n must be a positive number of jets; got -5"),
    "batch-size 0": (["--batch-size", "0"], "batch_size must be positive"),
    "run without gpt/": ([], "no_gpt/gpt (train one with `jetfast train-gpt`)"),
    "missing directory": (["--out", "{tmp}/missing/gen.h5"], "missing does not exist"),
    "existing output": (["--out", "{tmp}/old.h5"], "old.h5 already exists"),
    "directory --overwrite": (["--out", "{tmp}/old_dir", "--overwrite"], "old_dir is a directory"),
}


@pytest.mark.parametrize("case", REFUSED_GENERATE)
def test_refused_generate_is_one_line_and_leaves_nothing(run_dir, tmp_path, capsys, case):
    (tmp_path / "old.h5").write_bytes(b"keep me")
    (tmp_path / "old_dir").mkdir()
    shutil.copytree(run_dir, tmp_path / "no_gpt", ignore=shutil.ignore_patterns("gpt"))
    before = listing(tmp_path)
    extra, message = REFUSED_GENERATE[case]
    run_to_use = tmp_path / "no_gpt" if case == "run without gpt/" else run_dir
    argv = ["generate", run_to_use, "--n", "3", "--out", tmp_path / "gen.h5", *(a.format(tmp=tmp_path) for a in extra)]
    assert_refused(*run(argv, capsys), "generate", message)
    assert listing(tmp_path) == before


def test_the_corrected_rerun_of_a_refused_generate_just_works(run_dir, tmp_path, capsys):
    argv = ["generate", run_dir, "--n", "3", "--out", tmp_path / "gen.h5", "--batch-size", "2"]
    assert_refused(*run([*argv, "--top-p", "2"], capsys), "generate", "top_p")
    assert run([*argv, "--top-p", "0.9"], capsys)[0] == 0
    assert sorted(os.listdir(tmp_path)) == ["gen.h5"] and read(tmp_path / "gen.h5")["X_jets"].shape[0] == 3


def test_killed_run_resumes_to_the_same_file(run_dir, tmp_path):
    n, batch = 160, 16
    reference = read(generate_file(run_dir, n, tmp_path / "ref.h5", batch_size=batch, seed=7, progress=False))
    out = tmp_path / "killed.h5"
    command = [sys.executable, "-m", "jetfast.cli", "generate", str(run_dir), "--n", str(n), "--out", str(out),
               "--batch-size", str(batch), "--seed", "7"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = out.with_name(out.name + ".partial")
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once some, but not all, blocks are on disk
        time.sleep(0.05)
        try:
            with h5py.File(partial, "r", swmr=True) as f:
                if f["blocks_done"][0] >= 2:
                    break
        except (OSError, KeyError):
            pass
        if process.poll() is not None:
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert partial.exists() and not out.exists(), "the run should have been killed mid-way"
    with pytest.raises(FileExistsError, match="resume"):
        generate_file(run_dir, n, out, batch_size=batch, seed=7, progress=False)
    resumed = read(generate_file(run_dir, n, out, batch_size=batch, seed=7, resume=True, progress=False))
    for key in reference:
        np.testing.assert_array_equal(resumed[key], reference[key])


def test_bf16_generation_writes_the_same_layout_and_is_reproducible(run_dir, tmp_path):
    fp32 = read(generate_file(run_dir, 12, tmp_path / "fp32.h5", batch_size=8, seed=5, progress=False))
    bf16 = read(generate_file(run_dir, 12, tmp_path / "bf16.h5", batch_size=8, seed=5, precision="bf16", progress=False))
    again = read(generate_file(run_dir, 12, tmp_path / "again.h5", batch_size=8, seed=5, precision="bf16", progress=False))
    assert set(bf16) == set(fp32) and bf16["X_jets"].shape == fp32["X_jets"].shape
    np.testing.assert_array_equal(bf16["y"], fp32["y"])
    assert np.isfinite(bf16["X_jets"]).all() and (bf16["X_jets"] >= 0).all()
    for key in bf16:
        np.testing.assert_array_equal(bf16[key], again[key])
    with h5py.File(tmp_path / "bf16.h5", "r") as f:
        assert json.loads(f.attrs["jetfast_generate"])["precision"] == "bf16"
    with pytest.raises(InvalidArgument, match="precision"):
        generate_file(run_dir, 2, tmp_path / "y.h5", precision="fp8", progress=False)


def test_a_failed_write_stops_the_run_resumably(run_dir, tmp_path, monkeypatch):
    """Blocks are written beside the sampling of the next one: a write that fails stops the run
    with its own error, every block before it stays on disk, and --resume completes the file."""
    from jetfast.generation import writer

    n, batch = 80, 16
    reference = read(generate_file(run_dir, n, tmp_path / "ref.h5", batch_size=batch, seed=3, progress=False))
    write_block = writer._write_block

    def failing(f, block, *args):
        if block == 2:
            raise OSError("disk full")
        return write_block(f, block, *args)

    monkeypatch.setattr(writer, "_write_block", failing)
    out = tmp_path / "out.h5"
    with pytest.raises(OSError, match="disk full"):
        generate_file(run_dir, n, out, batch_size=batch, seed=3, progress=False)
    with h5py.File(out.with_name(out.name + ".partial"), "r") as f:
        assert f["blocks_done"][0] == 2
    monkeypatch.setattr(writer, "_write_block", write_block)
    resumed = read(generate_file(run_dir, n, out, batch_size=batch, seed=3, resume=True, progress=False))
    for key in reference:
        np.testing.assert_array_equal(resumed[key], reference[key])


def test_torchrun_shards_and_virtual_dataset(run_dir, tmp_path):
    out = tmp_path / "dist.h5"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "jetfast.cli", "generate", str(run_dir), "--num-jets", "9", "--out", str(out), "--batch-size", "4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    shards = sorted(tmp_path.glob("dist.rank*-of-2.h5"))
    assert [s.name for s in shards] == ["dist.rank0-of-2.h5", "dist.rank1-of-2.h5"]
    # Read from another working directory: the virtual dataset finds its shards beside it.
    code = f"import h5py; f = h5py.File({str(out)!r}); print(f['X_jets'].shape, f['y'].shape, float(f['X_jets'][8].sum()))"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True).stdout
    assert "(9, 125, 125, 3) (9,)" in shown
    with h5py.File(out, "r") as f, h5py.File(shards[0], "r") as s0, h5py.File(shards[1], "r") as s1:
        assert s0["X_jets"].shape[0] == 5 and s1["X_jets"].shape[0] == 4
        np.testing.assert_array_equal(f["X_jets"][5:], s1["X_jets"][()])
        np.testing.assert_array_equal(f["pt"][:5], s0["pt"][()])
        # Each rank has its own seed stream.
        assert not np.array_equal(s0["X_jets"][:4], s1["X_jets"][()])
