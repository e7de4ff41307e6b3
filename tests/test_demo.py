"""The whole pipeline, tiny: simulate, train both stages, generate, evaluate."""

import json
import math
import os
import subprocess
import sys

import h5py
import numpy as np


def test_tiny_end_to_end_demo(tmp_path):
    out = tmp_path / "demo"
    command = [
        sys.executable, "-m", "jetfast.cli", "demo", "--out", str(out), "--jets", "240", "--generate", "40",
        "--vae-epochs", "1", "--gpt-epochs", "1", "--latent-dim", "16", "--bins", "16", "--gpt-size", "32,2,1",
        "--workers", "2",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "the report:" in result.stdout
    for stage in ("data", "train-vae", "fit-bins", "encode", "train-gpt", "generate", "evaluate"):
        assert (out / f".done-{stage}").exists(), stage
    with h5py.File(out / "generated.h5", "r") as f:
        assert f["X_jets"].shape == (40, 125, 125, 3)
        assert np.isfinite(f["X_jets"][()]).all()
        assert set(np.unique(f["y"][()])) <= {0.0, 1.0}
    with h5py.File(out / "codes.h5", "r") as f:
        assert f["codes"].shape[1] == 16 and f["codes"].dtype == np.uint8
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    # The evaluation compared the generated jets with the run's test jets, observable by observable.
    assert {"real", "gen", "options", "summary", "distances", "c2st", "quark_gluon", "plots"} <= metrics.keys()
    assert metrics["gen"]["n_used"] == 40 and metrics["real"]["n_used"] > 0
    assert "test split" in metrics["real"]["selection"]
    assert {"pt", "mass", "girth", "tracks_sum", "ecal_sum", "hcal_sum"} <= metrics["distances"].keys()
    for name, entry in metrics["distances"].items():
        for key in ("w", "w_half", "floor", "real_mean", "gen_mean"):
            assert isinstance(entry[key], float) and math.isfinite(entry[key]), (name, key, entry[key])
        assert entry["w"] >= 0 and entry["n_gen"] == 40, name
    assert (out / "report" / "report.md").exists()
    # A second run finds every stage done and redoes nothing.
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done in an earlier run") == 7
