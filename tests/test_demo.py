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
    from jetfast.cli.demo import STAGES

    for stage in STAGES:
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
    check_ladder(out, metrics)
    check_like(out)
    # A second run finds every stage done and redoes nothing.
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done in an earlier run") == len(STAGES)


def check_like(out):
    """The test jets generated one to one from their class, pT and mass, and their response evaluated."""
    from jetfast.run import load_split

    test = np.sort(load_split(out / "run")["test"])
    with h5py.File(out / "jets.h5", "r") as real, h5py.File(out / "generated_like_test.h5", "r") as like:
        assert like["X_jets"].shape == (len(test), 125, 125, 3)
        np.testing.assert_array_equal(like["y"][()], real["y"][()][test])
        np.testing.assert_array_equal(like["pt_gen"][()], real["pt"][()][test])
        np.testing.assert_array_equal(like["m0_gen"][()], real["m0"][()][test])
    metrics = json.loads((out / "report_like_test" / "metrics.json").read_text())
    response = metrics["response"]
    assert response["n"]["real"] + response["outside"]["real"] == len(test)
    assert response["n"]["gen"] + response["outside"]["gen"] == len(test)


def check_ladder(out, metrics):
    """Every row of the fidelity ladder is measured on the run's test jets, and only on them."""
    import torch

    from jetfast.data.transforms import pad_to_model
    from jetfast.evaluate.observables import compute_observables
    from jetfast.models.vae import load_vae
    from jetfast.run import load_split

    test = np.sort(load_split(out / "run")["test"])
    rows = {row["row"]: row for row in metrics["ladder"]}
    assert list(rows) == ["real", "reconstruction", "bins", "prior", "transformer"]
    assert rows["real"]["n"] == len(test) - len(test) // 2  # the second half of the test jets
    assert rows["reconstruction"]["n"] == rows["bins"]["n"] == rows["prior"]["n"] == len(test)
    assert rows["transformer"]["n"] == 40 and metrics["real"]["n_used"] == len(test)
    for row in rows.values():
        assert "auc" in row["c2st"] or "skipped" in row["c2st"], row["row"]
        assert row["ratio"][row["worst_observable"]] == row["worst_ratio"] == max(row["ratio"].values())
    if "auc_real" in metrics["quark_gluon"]:  # each row scored by the one classifier trained on real jets
        # ... the run's training jets, scored on every test jet
        train = load_split(out / "run")["train"]
        assert metrics["quark_gluon"]["trained_on"] == "given" and metrics["quark_gluon"]["n_train"] == min(len(train), 5000)
        assert metrics["quark_gluon"]["n_real_test"] == len(test)
        assert rows["real"]["quark_gluon"]["auc"] == metrics["quark_gluon"]["auc_real"]
        assert rows["transformer"]["quark_gluon"]["auc"] == metrics["quark_gluon"]["auc_gen"]
        assert all("auc" in rows[k]["quark_gluon"] or "skipped" in rows[k]["quark_gluon"] for k in rows)
    section = (out / "report" / "report.md").read_text().split("## Fidelity ladder by observable")[1].split("\n## ")[0]
    assert all(f"{i}. {name}" in section for i, name in enumerate(rows)) and "| frac_dr005 |" in section

    # Row 1 recomputed from the test jets' file rows alone: the same mean of every observable.
    model, transform, _ = load_vae(out / "run")
    with h5py.File(out / "jets.h5", "r") as f:
        real = f["X_jets"][test]
        jets = torch.from_numpy(np.stack([f[key][test] for key in ("y", "pt", "m0")], axis=1))
    with torch.inference_mode():
        mu, _ = model.encode(transform.forward(pad_to_model(torch.from_numpy(real))), jets)
        # The ladder decodes test jets in file order, 256 at a time, from stream seed + 1.
        images = torch.cat([model.images(mu[i : i + 256], transform, jets[i : i + 256], seed=1, start=i)
                            for i in range(0, len(mu), 256)])
    expected, truth = compute_observables(images.numpy()), compute_observables(real)
    for name, ratio in rows["reconstruction"]["mean_ratio"].items():
        assert math.isclose(ratio, expected[name].mean() / truth[name].mean(), rel_tol=1e-4), name
