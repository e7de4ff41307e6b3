"""jetfast evaluate: observables against hand computations, metrics against scipy and
naive references, and the whole report on synthetic jet files."""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from jetfast.errors import JetFileError
from jetfast.data.kinematics import CELL_SIZE, cell_centers, jet_pt_mass
from jetfast.evaluate import metrics
from jetfast.evaluate.observables import (
    CORE_RADII,
    DEFAULT_THRESHOLDS,
    OBSERVABLES,
    PROFILE_EDGES,
    compute_observables,
    radial_profile,
)
from jetfast.evaluate.reader import read_jets
from jetfast.evaluate.report import evaluate
from tests.commands import assert_refused, listing, run
from tests.jetfiles import damage_chunk, jet_images, write_jet_file

C = 62  # the central pixel: the jet axis
COORDS = cell_centers()


def _dr(i, j):
    return float(np.hypot(COORDS[i], COORDS[j]))


def _empty(n=1):
    return np.zeros((n, 125, 125, 3), np.float32)


# -- observables on hand-made images ----------------------------------------------------------
def test_one_pixel():
    images = _empty()
    images[0, C, C, 1] = 5.0
    obs = compute_observables(images)
    assert list(obs) == list(OBSERVABLES)
    assert obs["ecal_sum"][0] == 5.0 and obs["tracks_sum"][0] == 0 and obs["hcal_sum"][0] == 0
    assert obs["ecal_mult"][0] == 1 and obs["tracks_mult"][0] == 0 and obs["hcal_mult"][0] == 0
    assert obs["pt"][0] == pytest.approx(5.0) and obs["mass"][0] == pytest.approx(0.0, abs=1e-3)
    assert obs["girth"][0] == 0.0
    for r in ("frac_dr005", "frac_dr01", "frac_dr02", "leading_frac"):
        assert obs[r][0] == pytest.approx(1.0)


def test_two_pixels_kinematics_and_shapes():
    images = _empty()
    # 3 GeV three cells to the side in phi, 1 GeV five cells up in eta; plus a Tracks pixel
    # that must not enter any calorimeter observable.
    images[0, C, C + 3, 1] = 3.0
    images[0, C + 5, C, 2] = 1.0
    images[0, C + 1, C + 1, 0] = 7.0
    obs = compute_observables(images)
    eta1, phi1, eta2, phi2 = 0.0, COORDS[C + 3], COORDS[C + 5], 0.0
    px = 3 * np.cos(phi1) + 1 * np.cos(phi2)
    py = 3 * np.sin(phi1) + 1 * np.sin(phi2)
    mass2 = 2 * 3 * 1 * (np.cosh(eta1 - eta2) - np.cos(phi1 - phi2))  # two massless particles
    assert obs["pt"][0] == pytest.approx(np.hypot(px, py), rel=1e-5)
    assert obs["mass"][0] == pytest.approx(np.sqrt(mass2), rel=1e-4)
    dr1, dr2 = _dr(C, C + 3), _dr(C + 5, C)
    assert obs["girth"][0] == pytest.approx((3 * dr1 + 1 * dr2) / 4, rel=1e-5)
    expected = {r: (3 * (dr1 < r) + 1 * (dr2 < r)) / 4 for r in CORE_RADII}  # dr1=0.052, dr2=0.087
    assert obs["frac_dr005"][0] == pytest.approx(expected[0.05])
    assert obs["frac_dr01"][0] == pytest.approx(expected[0.1])
    assert obs["frac_dr02"][0] == pytest.approx(expected[0.2])
    assert obs["leading_frac"][0] == pytest.approx(0.75)
    assert obs["tracks_sum"][0] == 7.0 and obs["tracks_mult"][0] == 1
    assert obs["ecal_mult"][0] == 1 and obs["hcal_mult"][0] == 1


def test_hcal_tower_block():
    tower = 2.5
    images = _empty()
    images[0, 60:65, 58:63, 2] = tower / 25  # one 5x5 tower, off centre
    obs = compute_observables(images)
    assert obs["hcal_sum"][0] == pytest.approx(tower, rel=1e-6)
    assert obs["hcal_mult"][0] == 25
    assert obs["leading_frac"][0] == pytest.approx(1 / 25, rel=1e-5)
    cells = [(i, j) for i in range(60, 65) for j in range(58, 63)]
    assert obs["girth"][0] == pytest.approx(np.mean([_dr(i, j) for i, j in cells]), rel=1e-5)
    assert obs["frac_dr005"][0] == pytest.approx(np.mean([_dr(i, j) < 0.05 for i, j in cells]))
    profile = radial_profile(images)[0]
    expected = np.histogram([_dr(i, j) for i, j in cells], bins=PROFILE_EDGES)[0] / 25
    np.testing.assert_allclose(profile, expected, atol=1e-6)


def test_threshold_is_strict_and_configurable():
    images = _empty()
    images[0, 10, 10] = DEFAULT_THRESHOLDS  # exactly at threshold: not above
    images[0, 11, 11] = np.array(DEFAULT_THRESHOLDS, np.float32) * 1.5
    obs = compute_observables(images)
    assert [obs[f"{c}_mult"][0] for c in ("tracks", "ecal", "hcal")] == [1, 1, 1]
    obs = compute_observables(images, thresholds=(0.0, 0.0, 1.0))
    assert [obs[f"{c}_mult"][0] for c in ("tracks", "ecal", "hcal")] == [2, 2, 0]
    with pytest.raises(ValueError, match="thresholds"):
        compute_observables(images, thresholds=(1.0, 2.0))


def test_empty_jets_and_empty_batch():
    obs = compute_observables(_empty(2))
    for name, values in obs.items():
        assert values.shape == (2,) and np.all(values == 0), name
    obs = compute_observables(np.zeros((0, 125, 125, 3), np.float32), with_profile=True)
    assert all(len(v) == 0 for v in obs.values())
    assert obs["radial_profile"].shape == (0, len(PROFILE_EDGES) - 1)


@pytest.mark.parametrize("shape", [(125, 125, 3), (2, 125, 125), (2, 125, 124, 3), (2, 3, 125, 125)])
def test_bad_shapes(shape):
    with pytest.raises(ValueError, match="expected jet images"):
        compute_observables(np.zeros(shape, np.float32))


def test_random_images_against_per_jet_reference(rng):
    n, size = 5, 31  # odd, small images: the functions take any square size
    images = (rng.random((n, size, size, 3)) < 0.1) * rng.exponential(2.0, (n, size, size, 3))
    images = images.astype(np.float32)
    obs = compute_observables(images, with_profile=True)
    coords = cell_centers(size, CELL_SIZE)
    dr = np.hypot(coords[:, None], coords[None, :])
    pt, mass = jet_pt_mass(images)
    np.testing.assert_allclose(obs["pt"], pt, rtol=1e-5)
    np.testing.assert_allclose(obs["mass"], mass, rtol=1e-4, atol=1e-4)
    for k in range(n):
        calo = images[k, :, :, 1].astype(np.float64) + images[k, :, :, 2]
        total = calo.sum()
        assert obs["girth"][k] == pytest.approx((calo * dr).sum() / total, rel=1e-5)
        assert obs["frac_dr01"][k] == pytest.approx(calo[dr < 0.1].sum() / total, rel=1e-5)
        assert obs["leading_frac"][k] == pytest.approx(calo.max() / total, rel=1e-5)
        assert obs["ecal_mult"][k] == np.count_nonzero(images[k, :, :, 1] > DEFAULT_THRESHOLDS[1])
        assert obs["tracks_sum"][k] == pytest.approx(images[k, :, :, 0].sum(dtype=np.float64), rel=1e-6)
        expected = np.histogram(dr, bins=PROFILE_EDGES, weights=calo)[0] / total
        np.testing.assert_allclose(obs["radial_profile"][k], expected, atol=1e-6)


# -- metrics --------------------------------------------------------------------------------------
def test_wasserstein_matches_scipy_and_naive_bootstrap(rng):
    u, v = rng.normal(size=301), rng.exponential(size=157)
    value, err = metrics.wasserstein(u, v, bootstrap=400, rng=rng)
    assert value == pytest.approx(wasserstein_distance(u, v))
    naive = [wasserstein_distance(rng.choice(u, len(u)), rng.choice(v, len(v))) for _ in range(400)]
    assert err == pytest.approx(np.std(naive, ddof=1), rel=0.25)
    assert np.isnan(metrics.wasserstein(u, v)[1])
    # The subsampled bootstrap of large samples estimates the same error.
    sub = metrics.wasserstein(u, v, bootstrap=400, rng=rng, max_bootstrap_size=150)
    assert sub[0] == value and sub[1] == pytest.approx(err, rel=0.35)
    with pytest.raises(metrics.TooFewJets):
        metrics.wasserstein(u, [])
    with pytest.raises(ValueError, match="NaN"):
        metrics.wasserstein(u, [np.nan])


def test_distance_table_floor(rng):
    real = {"a": rng.normal(size=3000), "b": rng.exponential(size=3000)}
    same = {"a": rng.normal(size=2001), "b": rng.exponential(size=2001)}
    shifted = {"a": rng.normal(1.0, 1, size=2001), "b": 3 * rng.exponential(size=2001)}
    ok = metrics.distance_table(real, same, bootstrap=20)
    bad = metrics.distance_table(real, shifted, bootstrap=20)
    for name in real:
        assert 0.15 < ok[name]["ratio"] < 5
        assert bad[name]["ratio"] > 6
        assert ok[name]["n_half"] == 1500 and ok[name]["floor_err"] > 0
    assert bad["a"]["w"] == pytest.approx(1.0, abs=0.15)
    assert bad["a"]["w_norm"] == pytest.approx(bad["a"]["w"] / real["a"].std())


def test_distance_table_averages_splits(rng):
    """The floor and W(half, gen) are means over random splits: for a perfect generator the
    ratio sits near 1 and moves with the split far less than one split's ratio does."""
    real = {"x": rng.gamma(2.0, size=1200)}
    gen = {"x": rng.gamma(2.0, size=4000)}
    # The same jets split 40 ways: what is left of the spread is the splits'.
    one = [metrics.distance_table(real, gen, bootstrap=0, seed=s, splits=1)["x"]["ratio"] for s in range(40)]
    many = [metrics.distance_table(real, gen, bootstrap=0, seed=s)["x"] for s in range(40)]
    assert all(entry["splits"] == metrics.FLOOR_SPLITS for entry in many)
    # (0.16-0.33 of it over 25 seeds; 1 without the averaging)
    assert np.std([entry["ratio"] for entry in many]) < 0.5 * np.std(one)
    # Fresh jets each time: the ratio of a perfect generator is 1 on average.
    fresh = [metrics.distance_table({"x": rng.gamma(2.0, size=1200)}, {"x": rng.gamma(2.0, size=4000)},
                                    bootstrap=0, seed=s)["x"]["ratio"] for s in range(40)]
    assert abs(np.mean(fresh) - 1) < 0.1
    # The means over splits are means of W of the same sizes as one split's.
    entry = many[0]
    assert entry["ratio"] == pytest.approx(entry["w_half"] / entry["floor"])
    assert 0.5 < entry["floor"] / np.mean([metrics.distance_table(real, gen, bootstrap=0, seed=s, splits=1)["x"]["floor"]
                                            for s in range(40)]) < 1.5
    with pytest.raises(ValueError, match="splits"):
        metrics.distance_table(real, gen, splits=0)


def test_classifier_two_sample_test(rng):
    real = rng.normal(size=(800, 4)).astype(np.float32)
    same = rng.normal(size=(900, 4)).astype(np.float32)
    other = rng.normal(size=(900, 4)).astype(np.float32)
    other[:, 2] *= 3.0
    ok = metrics.classifier_two_sample_test(real, same, bootstrap=20)
    bad = metrics.classifier_two_sample_test(real, other, bootstrap=20)
    assert ok["n_per_side"] == 800 and len(ok["fold_aucs"]) == 3
    assert abs(ok["auc"] - 0.5) < 0.08
    assert bad["auc"] > 0.7 and bad["auc_err"] > 0
    with pytest.raises(metrics.TooFewJets, match="two-sample"):
        metrics.classifier_two_sample_test(real[:10], same)


def test_cnn_two_sample_test_sees_images(seed):
    real, _ = jet_images(240, seed=seed)
    gen, _ = jet_images(240, seed=seed + 1)
    coarse = lambda im: im.reshape(len(im), 25, 5, 25, 5, 3).sum(axis=(2, 4))  # noqa: E731
    far = metrics.cnn_two_sample_test(coarse(real), 5 * coarse(gen), epochs=4, bootstrap=10)
    assert far["auc"] > 0.85 and far["n_test"] == 160
    with pytest.raises(metrics.TooFewJets, match="CNN"):
        metrics.cnn_two_sample_test(coarse(real[:10]), coarse(gen))


def test_quark_gluon_transfer_needs_both_classes(rng):
    x = rng.normal(size=(600, 3))
    y = (np.arange(600) % 2).astype(np.float32)
    x[y == 1, 0] += 3.0  # AUC of the best cut: 0.98
    result = metrics.quark_gluon_transfer(x, y, x, y, bootstrap=10)
    assert result["auc_real"] > 0.8 and result["auc_gen"] > 0.8
    with pytest.raises(metrics.TooFewJets, match="each class"):
        metrics.quark_gluon_transfer(x, y, x, np.ones(600), bootstrap=10)


def test_quark_gluon_transfer_scores_other_sets_with_the_same_classifier(rng):
    x = rng.normal(size=(600, 3))
    y = (np.arange(600) % 2).astype(np.int8)
    x[y == 1, 0] += 3.0
    washed = rng.normal(size=(400, 3))  # no class information left: AUC near 0.5
    swapped = x.copy()
    swapped[:, 0] = np.where(y == 1, x[:, 0] - 3.0, x[:, 0] + 3.0)  # the classes exchanged: AUC near 0
    result = metrics.quark_gluon_transfer(
        x, y, x, y, bootstrap=10,
        others={"washed": (washed, np.arange(400) % 2), "swapped": (swapped, y), "one class": (x, np.ones(600))})
    others = result["auc_others"]
    assert abs(others["washed"]["auc"] - 0.5) < 0.1 and others["swapped"]["auc"] < 0.2
    assert others["washed"]["auc_err"] > 0 and "skipped" in others["one class"]


def test_quark_gluon_transfer_trains_on_the_given_jets_and_scores_every_real_jet(rng):
    """With ``train``, the classifier learns from those jets alone and is scored on all real jets; a
    training set whose classes are swapped gives a classifier that inverts the real jets' classes."""
    x = rng.normal(size=(600, 3))
    y = (np.arange(600) % 2).astype(np.int8)
    x[y == 1, 0] += 3.0
    train_x = rng.normal(size=(1000, 3))
    train_y = (np.arange(1000) % 2).astype(np.int8)
    train_x[train_y == 1, 0] += 3.0
    result = metrics.quark_gluon_transfer(x, y, x[:400], y[:400], bootstrap=10, train=(train_x, train_y))
    assert result["n_train"] == 1000 and result["n_real_test"] == 600 and result["trained_on"] == "given"
    assert result["auc_real"] > 0.9
    swapped = metrics.quark_gluon_transfer(x, y, x, y, bootstrap=10, train=(train_x, 1 - train_y))
    assert swapped["auc_real"] < 0.1 and swapped["n_real_test"] == 600
    with pytest.raises(metrics.TooFewJets, match="training jets of each class"):
        metrics.quark_gluon_transfer(x, y, x, y, bootstrap=10, train=(train_x, np.ones(1000)))


# -- Fréchet and kernel physics distances -----------------------------------------------------------
def _frechet_by_eigenvalues(mean_a, cov_a, mean_b, cov_b):
    """Tr((A B)^(1/2)) = sum of sqrt(eigenvalues of A^(1/2) B A^(1/2)), a symmetric route."""
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    diff = mean_a - mean_b
    return diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(middle, 0, None)).sum()


def test_frechet_distance_against_eigenvalues(rng):
    for d in (1, 3, 13):
        a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
        cov_a, cov_b = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
        mean_a, mean_b = rng.normal(size=d), rng.normal(size=d)
        got = metrics.frechet_distance(mean_a, cov_a, mean_b, cov_b)
        assert got == pytest.approx(_frechet_by_eigenvalues(mean_a, cov_a, mean_b, cov_b), rel=1e-6, abs=1e-9)
    # Diagonal covariances: sum of squared mean and standard-deviation differences.
    assert metrics.frechet_distance([0, 1], np.diag([1.0, 4.0]), [1, 1], np.diag([4.0, 1.0])) == pytest.approx(3.0)


def test_fpd_finds_a_shift_and_not_a_resample(rng):
    real = rng.normal(size=(3000, 4)) + 10.0  # max |value| ~ 14: JetNet's normalisation divides by it
    same = rng.normal(size=(3000, 4)) + 10.0
    shifted = same + np.array([1.0, 0, 0, 0])
    scale = np.abs(real).max(axis=0)
    expected = (1.0 / scale[0]) ** 2  # the Fréchet distance of the normalised Gaussians
    null = metrics.fpd(real, same, seed=1)
    found = metrics.fpd(real, shifted, seed=1)
    assert null["value"] < 0.1 * expected
    assert found["value"] == pytest.approx(expected, rel=0.2)
    assert found["sizes"] == [1200, 3000]
    with pytest.raises(metrics.TooFewJets):
        metrics.fpd(real[:10], same)


def test_mmd_polynomial_against_a_double_loop(rng):
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3)) + 0.5
    k = lambda a, b: (a @ b / 3 + 1) ** 4  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(5)) / 35
    assert metrics.mmd_polynomial(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_kpd_separates_distributions(rng):
    real = rng.normal(size=(2000, 5))
    null = metrics.kpd(real, rng.normal(size=(2000, 5)), batch_size=1000)
    found = metrics.kpd(real, rng.normal(size=(2000, 5)) * 1.5)
    # (|value| / err of same-distribution samples: 99.9th percentile 3.4 over 1,000 seeds)
    assert abs(null["value"]) < 4 * null["err"] + 1e-4
    assert found["value"] > 10 * max(null["err"], 1e-5) and found["batch_size"] == 2000


# -- the whole report -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, module_seed):
    """One file of 1400 synthetic jets; real = its first 700, generated files from the rest.
    Each half holds exactly 350 jets of either class: halves with different class fractions
    differ in every observable at once, which is a real difference, not the floor."""
    d = tmp_path_factory.mktemp("evaluate")
    halves = [jet_images(700, seed=module_seed + i) for i in (0, 1)]
    images = np.concatenate([h[0] for h in halves])
    labels = np.concatenate([h[1] for h in halves])
    write_jet_file(d / "real.h5", images=images, labels=labels)
    write_jet_file(d / "same.h5", images=images[700:], labels=labels[700:], compression="gzip", chunk=50)
    write_jet_file(d / "scaled.h5", images=2 * images[700:], labels=labels[700:])
    return d, images, labels


def test_real_against_real_is_at_the_floor(synthetic):
    d, _, _ = synthetic
    m = evaluate(d / "real.h5", d / "same.h5", d / "out_same", real_indices=np.arange(700),
                 bootstrap=10, plots=False, progress=False)
    assert m["real"]["n_used"] == 700 and m["gen"]["n_used"] == 700
    assert m["c2st"]["auc"] < 0.6
    ratios = [v["ratio"] for v in m["distances"].values()]
    assert np.median(ratios) < 2.0
    qg = m["quark_gluon"]
    assert qg["auc_real"] > 0.8 and abs(qg["auc_real"] - qg["auc_gen"]) < 0.1
    assert set(m["distances_by_class"]) == {"quark", "gluon"}


def test_scaled_jets_are_detected(synthetic):
    d, _, _ = synthetic
    m = evaluate(d / "real.h5", d / "scaled.h5", d / "out_scaled", real_indices=np.arange(700),
                 bootstrap=10, plots=False, progress=False)
    assert m["c2st"]["auc"] > 0.9
    for name in ("tracks_sum", "ecal_sum", "hcal_sum", "pt", "mass"):
        assert m["distances"][name]["ratio"] > 5, name
    # Shapes do not change under a global scale: those stay near the floor.
    assert m["distances"]["girth"]["ratio"] < 5  # two noise-level distances: 99.9% below 3.5


def test_quark_vs_gluon_is_detected(synthetic, tmp_path):
    _, images, labels = synthetic
    quarks, gluons = images[labels == 1][:300], images[labels == 0][:300]
    write_jet_file(tmp_path / "q.h5", images=quarks, labels=np.ones(len(quarks)))
    write_jet_file(tmp_path / "g.h5", images=gluons, labels=np.zeros(len(gluons)))
    m = evaluate(tmp_path / "q.h5", tmp_path / "g.h5", tmp_path / "out", bootstrap=0, plots=False, progress=False)
    assert m["c2st"]["auc"] > 0.8
    assert m["distances"]["girth"]["ratio"] > 5
    assert "skipped" in m["quark_gluon"]  # one class per file


def test_report_files_and_plots(synthetic):
    d, _, _ = synthetic
    out = d / "out_report"
    m = evaluate(d / "real.h5", d / "same.h5", out, max_jets=100, bootstrap=5, progress=False, cnn=True)
    assert m["c2st_cnn"]["n_per_side"] == 100 and 0 <= m["c2st_cnn"]["auc"] <= 1
    assert m["real"]["n_used"] == 100 and m["gen"]["n_used"] == 100
    stored = json.loads((out / "metrics.json").read_text())
    assert stored["distances"]["pt"]["w"] == pytest.approx(m["distances"]["pt"]["w"])
    assert stored["c2st"]["auc"] == pytest.approx(m["c2st"]["auc"])
    md = (out / "report.md").read_text()
    assert "| pt |" in md and "floor" in md and "plots/observables.png" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(m["plots"])
    for rel in m["plots"].values():
        assert (out / rel).stat().st_size > 10_000, rel
    for name in ("observables", "classes", "mean_images", "jets_real", "jets_generated", "radial_profile"):
        assert name in m["plots"]
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("layout", [("lzf", False, 7), ("gzip", True, 32), (None, False, None)])
def test_streaming_reader_matches_in_memory(synthetic, tmp_path, layout, rng):
    _, images, labels = synthetic
    compression, shuffle, chunk = layout
    images, labels = images[:61], labels[:61]
    write_jet_file(tmp_path / "j.h5", images=images, labels=labels, compression=compression, shuffle=shuffle,
                   chunk=chunk)
    picked = np.sort(rng.choice(61, size=23, replace=False))
    sample = read_jets(tmp_path / "j.h5", picked, chunk_jets=10, progress=False)
    expected = compute_observables(images[picked], with_profile=True)
    for name in OBSERVABLES:
        np.testing.assert_array_equal(sample.observables[name], expected[name], err_msg=name)
    np.testing.assert_array_equal(sample.profile, expected["radial_profile"])
    np.testing.assert_array_equal(sample.labels, labels[picked].astype(np.int8))
    np.testing.assert_allclose(sample.mean_image(), images[picked].mean(0, dtype=np.float64), rtol=1e-5, atol=1e-9)
    quarks = picked[labels[picked] == 1]
    np.testing.assert_allclose(sample.mean_image(1), images[quarks].mean(0, dtype=np.float64), rtol=1e-5, atol=1e-9)
    assert sample.jets_per_key == {"all": 23, 1: len(quarks), 0: 23 - len(quarks)}
    assert len(sample.examples) == 4


# -- bad input ------------------------------------------------------------------------------------
def test_jets_that_break_the_contract_are_refused_by_index(synthetic, tmp_path):
    _, images, labels = synthetic
    bad = images[:100].copy()
    bad[3, 60, 60, 1] = np.nan
    bad[7, 0, 0, 2] = np.inf
    bad[40, 5, 5, 0] = -0.5
    bad[41, 5, 5, 0] = 3.3e38
    write_jet_file(tmp_path / "bad.h5", images=bad, labels=labels[:100])
    with pytest.raises(JetFileError, match=r"bad.h5: jet\(s\) 3, 7 have NaN or infinite pixels; jet\(s\) 40 have "
                                           r"negative pixels; jet\(s\) 41 have pixels above 100000 GeV"):
        read_jets(tmp_path / "bad.h5", progress=False)
    # A selection without them reads.
    assert read_jets(tmp_path / "bad.h5", np.arange(8, 40), progress=False).n == 32


def test_bad_files(synthetic, tmp_path):
    d, _, _ = synthetic
    with pytest.raises(FileNotFoundError, match="not found"):
        evaluate(tmp_path / "missing.h5", d / "same.h5", tmp_path / "o", progress=False)
    with h5py.File(tmp_path / "nokey.h5", "w") as f:
        f["images"] = np.zeros((3, 125, 125, 3), np.float32)
    with pytest.raises(JetFileError, match="no dataset 'X_jets'"):
        read_jets(tmp_path / "nokey.h5", progress=False)
    with h5py.File(tmp_path / "shape.h5", "w") as f:
        f["X_jets"] = np.zeros((3, 3, 125, 125), np.float32)
    with pytest.raises(JetFileError, match="channels last"):
        read_jets(tmp_path / "shape.h5", progress=False)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(JetFileError, match="not a readable HDF5"):
        read_jets(tmp_path / "text.h5", progress=False)
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f["X_jets"] = _empty(0)
        f["y"] = np.zeros(0, np.float32)
    with pytest.raises(JetFileError, match="no jets"):
        read_jets(tmp_path / "empty.h5", progress=False)
    with h5py.File(tmp_path / "partial.h5", "w") as f:
        f["X_jets"] = _empty(2)
        f["blocks_done"] = np.zeros(1, np.int64)
    with pytest.raises(JetFileError, match="unfinished"):
        read_jets(tmp_path / "partial.h5", progress=False)
    with pytest.raises(JetFileError, match="different file"):
        read_jets(d / "same.h5", np.array([0, 700]), progress=False)


def test_few_jets_skip_the_classifiers_but_still_report(synthetic, tmp_path):
    d, images, labels = synthetic
    write_jet_file(tmp_path / "few.h5", images=images[:12], labels=labels[:12])
    m = evaluate(d / "real.h5", tmp_path / "few.h5", tmp_path / "out", bootstrap=0, plots=False, progress=False)
    assert "needs >= 30" in m["c2st"]["skipped"]
    assert "skipped" in m["quark_gluon"]
    assert "Skipped" in (tmp_path / "out" / "report.md").read_text()


def test_labels_without_classes_are_tolerated(synthetic, tmp_path):
    _, images, _ = synthetic
    path = tmp_path / "nolabels.h5"
    with h5py.File(path, "w") as f:
        f["X_jets"] = images[:40]
        f["y"] = np.full(40, -1.0, np.float32)  # unconditional generation
    sample = read_jets(path, progress=False)
    assert sample.labels is None and "other than 0 and 1" in sample.label_note


# -- the command line -----------------------------------------------------------------------------
def test_cli_help(capsys):
    from jetfast.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--real", "--gen", "--out", "--run", "--max-jets", "--threshold", "--bootstrap", "--seed"):
        assert option in text


def test_cli_with_run_split_and_errors(synthetic, tmp_path, capsys):
    from jetfast.cli import main

    d, _, _ = synthetic
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    test = np.arange(0, 700, 3)
    np.savez(run_dir / "split.npz", train=np.arange(1, 700, 3), val=np.arange(2, 700, 3), test=test)
    code = main(["evaluate", "--real", str(d / "real.h5"), "--gen", str(d / "same.h5"), "--run", str(run_dir),
                 "--no-plots", "--bootstrap", "0"])
    assert code == 0
    out = capsys.readouterr().out
    assert "report:" in out
    stored = json.loads((run_dir / "eval" / "same" / "metrics.json").read_text())
    assert stored["real"]["n_used"] == len(test) and "test split" in stored["real"]["selection"]

    # Without --real the run's own data file (config.json "data") is the real sample.
    (run_dir / "config.json").write_text(json.dumps({"data": str(d / "real.h5")}))
    code = main(["evaluate", "--gen", str(d / "same.h5"), "--run", str(run_dir), "--out", str(tmp_path / "o2"),
                 "--no-plots", "--bootstrap", "0", "--max-jets", "100"])
    assert code == 0
    stored = json.loads((tmp_path / "o2" / "metrics.json").read_text())
    assert stored["real"]["path"] == str(d / "real.h5") and stored["real"]["n_used"] == 100
    capsys.readouterr()

    code = main(["evaluate", "--real", str(tmp_path / "missing.h5"), "--gen", str(d / "same.h5"),
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "not found" in capsys.readouterr().err
    assert main(["evaluate", "--real", str(d / "real.h5"), "--gen", str(d / "same.h5")]) == 2
    assert main(["evaluate", "--gen", str(d / "same.h5"), "--out", str(tmp_path / "o3")]) == 2
    assert "give --real" in capsys.readouterr().err


DAMAGED_INPUTS = {
    # (how the generated file is damaged, what the error line names)
    "chunk that fails to decode": (lambda path: damage_chunk(path, 1, "start"), ["gen.h5", "jets 32..63", "restore it"]),
    "chunk that decodes to garbage": (lambda path: damage_chunk(path, 1, "middle"), ["gen.h5", "restore it"]),
    "NaN pixels in a generated file": (None, ["gen.h5: jet(s) 5, 6 have NaN or infinite pixels"]),
    "unknown filter": ("filter", ["gen.h5:X_jets uses HDF5 filter 307", "plugin"]),
}


@pytest.mark.parametrize("case", DAMAGED_INPUTS)
@pytest.mark.parametrize("side", ["--gen", "--real"])
def test_cli_refuses_damaged_files_in_one_line(synthetic, tmp_path, capsys, case, side):
    d, images, labels = synthetic
    damage, fragments = DAMAGED_INPUTS[case]
    path = tmp_path / "gen.h5"
    images = images[700:900].copy()
    if case.startswith("NaN"):
        images[[5, 6], 60, 60, 0] = np.nan
    if damage == "filter":
        with h5py.File(path, "w") as f:
            f.create_dataset("X_jets", data=images, chunks=(32, 125, 125, 3), compression=307, allow_unknown_filter=True)
            f["y"] = labels[700:900]
    else:
        write_jet_file(path, images=images, labels=labels[700:900], chunk=32)
    if callable(damage):
        damage(path)
    other = "--real" if side == "--gen" else "--gen"
    argv = ["evaluate", side, path, other, d / "real.h5", "--out", tmp_path / "eval", "--bootstrap", "0", "--no-plots"]
    before = listing(tmp_path)
    line = assert_refused(*run(argv, capsys), "evaluate", *fragments)
    if case == "chunk that decodes to garbage" and "jet(s)" in line:  # the contract check names jets of chunk 1
        assert re.search(r"jet\(s\) (3[2-9]|[4-5]\d|6[0-3])\b", line), line
    assert listing(tmp_path) == before


@pytest.mark.parametrize("step, offset", [(25, 0), (25, 10), (3, 1), (1, 0)])
def test_histogram_bins_of_counts_follow_their_lattice(rng, step, offset):
    """Counts on a lattice (HCAL pixels come 25 at a time) get bins of whole lattice steps,
    centred on it: no bin between the first and the last is empty by construction, and every
    bin holds as many possible values as the others."""
    from jetfast.evaluate.plots import _bins

    real = offset + step * rng.poisson(15, size=700)
    gen = offset + step * rng.poisson(16, size=500)
    edges = _bins(real, gen)
    widths = np.diff(edges)
    assert np.allclose(widths, widths[0]) and widths[0] % step == 0
    lattice = np.arange(real.min(), max(real.max(), gen.max()) + 1, step)
    held = np.histogram(lattice, edges)[0]
    inside = (edges[:-1] >= lattice.min() - step) & (edges[1:] <= lattice.max() + step)
    assert held[inside].min() == held[inside].max() == widths[0] // step
    assert not np.isin(edges, lattice).any()  # no possible value sits on an edge
    assert len(edges) <= 40 + 3  # about 40 bins, not one per value
    # A wide range of counts (ECAL pixels: ~80 values) is binned a few values at a time.
    wide = _bins(offset + step * rng.integers(0, 80, size=1200))
    assert 30 <= len(wide) - 1 <= 42 and np.diff(wide)[0] == 2 * step
    # Continuous values keep equal-width bins over the central 99.8%.
    smooth = _bins(rng.normal(size=500) * 7.3)
    assert len(smooth) == 41
