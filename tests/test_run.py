"""The run directory, the data split, and the training utilities: guards, early stopping, plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from jetfast.distributed import setup_distributed
from jetfast.errors import RunDirExists, TrainingDiverged
from jetfast.run import RunDir, load_split, make_split, save_split
from jetfast.train.loop import EarlyStopping, check_finite, plot_losses, rng_state, seed_everything, set_rng_state


@pytest.mark.parametrize("n", [3, 10, 101, 1000])
def test_split_partitions_all_indices(n, seed):
    seed = seed
    split = make_split(n, seed=seed)
    joined = np.concatenate([split["train"], split["val"], split["test"]])
    assert sorted(joined.tolist()) == list(range(n))
    assert all(len(split[k]) >= 1 for k in ("train", "val", "test"))
    assert all(np.all(np.diff(split[k]) > 0) for k in split)
    if n >= 100:
        assert abs(len(split["train"]) - 0.8 * n) <= 2
    again = make_split(n, seed=seed)
    assert all(np.array_equal(split[k], again[k]) for k in split)


def test_split_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 3"):
        make_split(2)
    with pytest.raises(ValueError, match="sum"):
        make_split(10, fractions=(0.5, 0.5, 0.5))


def test_split_roundtrip(tmp_path):
    split = make_split(57, seed=3)
    save_split(tmp_path, split)
    loaded = load_split(tmp_path)
    assert all(np.array_equal(split[k], loaded[k]) for k in split)
    assert not list(tmp_path.glob("*.tmp*"))


def test_run_dir_lifecycle(tmp_path):
    out = tmp_path / "run"
    run = RunDir.prepare(out)
    assert (out / "README.txt").is_file()
    run.write_config({"lr": 1e-3, "widths": (1, 2)})
    assert json.loads(run.config_path.read_text())["widths"] == [1, 2]
    for epoch in range(3):
        run.log_metrics({"epoch": epoch, "train_loss": 3.0 - epoch, "val_loss": 3.5 - epoch})
    assert [r["epoch"] for r in run.read_metrics()] == [0, 1, 2]
    run.truncate_metrics(after_epoch=1)
    assert [r["epoch"] for r in run.read_metrics()] == [0, 1]
    run.save_checkpoint({"w": torch.arange(3)}, "last")
    assert torch.equal(run.load_checkpoint("last")["w"], torch.arange(3))
    assert not list(run.checkpoints.glob("*.tmp"))
    assert plot_losses(run.metrics_path, run.loss_plot).stat().st_size > 1000

    with pytest.raises(RunDirExists, match="--resume"):
        RunDir.prepare(out)
    RunDir.prepare(out, resume=True)
    fresh = RunDir.prepare(out, overwrite=True)
    assert not fresh.checkpoint("last").exists() and not fresh.metrics_path.exists()
    with pytest.raises(FileNotFoundError, match="resume"):
        RunDir.prepare(tmp_path / "nothing", resume=True)


def test_a_run_that_never_checkpointed_is_started_again(tmp_path):
    out = tmp_path / "run"
    run = RunDir.prepare(out)
    run.write_config({"lr": 1e-3})
    assert run.never_checkpointed()
    again = RunDir.prepare(out)  # no --overwrite needed: there is nothing to keep
    assert again.readme_path.is_file() and not again.config_path.exists()
    again.save_checkpoint({"epoch": 0}, "last")
    assert not again.never_checkpointed()
    with pytest.raises(RunDirExists, match="--resume"):
        RunDir.prepare(out)
    # A directory that is not a jetfast run is never taken for one.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.txt").write_text("my notes")
    assert not RunDir(mine).never_checkpointed()
    with pytest.raises(RunDirExists):
        RunDir.prepare(mine)
    assert (mine / "README.txt").read_text() == "my notes"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite(bad):
    check_finite(torch.tensor(1.5), step=1)
    with pytest.raises(TrainingDiverged, match="step 7"):
        check_finite(torch.tensor(bad), step=7)


def test_early_stopping():
    stopper = EarlyStopping(patience=2, min_delta=0.01)
    assert stopper.step(1.0) and not stopper.should_stop
    assert not stopper.step(0.995)  # within min_delta: not an improvement
    assert not stopper.should_stop
    assert not stopper.step(1.2)
    assert stopper.should_stop and stopper.best == 1.0 and stopper.best_epoch == 0
    clone = EarlyStopping()
    clone.load_state_dict(stopper.state_dict())
    assert clone.should_stop and math.isclose(clone.best, 1.0)


def test_rng_state_roundtrip():
    before = torch.are_deterministic_algorithms_enabled()
    seed_everything(5, deterministic=False)
    assert torch.are_deterministic_algorithms_enabled() == before
    state = rng_state()
    first = (torch.rand(3), np.random.rand(2))
    set_rng_state(state)
    second = (torch.rand(3), np.random.rand(2))
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])


def test_setup_distributed_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rank, world, local, device = setup_distributed()
    assert (rank, world, local) == (0, 1, 0)
    assert device.type in ("cpu", "cuda")
