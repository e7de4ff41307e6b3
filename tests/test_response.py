"""The detector response of jetfast evaluate: per-bin numbers against NumPy on responses of
known distribution, verdicts that find a shifted or widened response and pass an identical
one, the kinematics the reader keeps, and the report on small jet files."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from jetfast.errors import InvalidArgument, JetFileError
from jetfast.evaluate import report
from jetfast.evaluate.metrics import TooFewJets, mean_and_width
from jetfast.evaluate.observables import compute_observables
from jetfast.evaluate.reader import collect_jets, read_jets
from jetfast.evaluate.report import evaluate
from jetfast.evaluate.response import DEFAULT_PT_EDGES, bin_index, check_edges, response_table
from tests.jetfiles import jet_images, write_jet_file

EDGES = np.asarray(DEFAULT_PT_EDGES)


def _jets(rng, n, mean=1.2, width=0.1, lo=60.0, hi=210.0):
    """(generator-level pT, response) of n jets: pT flat in [lo, hi), response N(mean, width)."""
    return rng.uniform(lo, hi, n), rng.normal(mean, width, n)


def _in_bin(pt, b, edges=EDGES):
    last = b == len(edges) - 2
    return (pt >= edges[b]) & ((pt <= edges[b + 1]) if last else (pt < edges[b + 1]))


# -- mean and width with bootstrap errors ------------------------------------------------------------
def test_mean_and_width_against_numpy_and_a_naive_bootstrap(rng):
    values = rng.normal(1.2, 0.1, 701)
    got = mean_and_width(values, bootstrap=400, rng=rng)
    assert got["n"] == 701
    assert got["mean"] == pytest.approx(values.mean(), rel=1e-12)
    assert got["width"] == pytest.approx(values.std(), rel=1e-12)
    replicas = [rng.choice(values, len(values)) for _ in range(400)]
    assert got["mean_err"] == pytest.approx(np.std([r.mean() for r in replicas], ddof=1), rel=0.25)
    assert got["width_err"] == pytest.approx(np.std([r.std() for r in replicas], ddof=1), rel=0.25)
    # Gaussian values: sigma / sqrt(n) and sigma / sqrt(2 n).
    assert got["mean_err"] == pytest.approx(0.1 / np.sqrt(701), rel=0.25)
    assert got["width_err"] == pytest.approx(0.1 / np.sqrt(2 * 701), rel=0.25)
    # Bootstrapped on a subsample, scaled back: the same errors.
    sub = mean_and_width(values, bootstrap=400, rng=rng, max_bootstrap_size=200)
    assert sub["mean"] == got["mean"] and sub["mean_err"] == pytest.approx(got["mean_err"], rel=0.35)
    assert np.isnan(mean_and_width(values)["mean_err"]) and np.isnan(mean_and_width(values, bootstrap=1)["width_err"])
    with pytest.raises(TooFewJets):
        mean_and_width([])
    with pytest.raises(ValueError, match="NaN"):
        mean_and_width([1.0, np.inf])


# -- bins ---------------------------------------------------------------------------------------------
def test_bins_follow_numpy_histogram(rng):
    # every edge, values just beside the edges and outside the range
    pt = np.concatenate([EDGES, np.nextafter(EDGES, 0), np.nextafter(EDGES, np.inf), rng.uniform(0, 300, 101)])
    index = bin_index(pt, EDGES)
    expected, _ = np.histogram(pt, EDGES)
    np.testing.assert_array_equal(np.bincount(index[index >= 0], minlength=len(EDGES) - 1), expected)
    assert index[pt == 200.0].tolist() == [6] and index[pt == 80.0].tolist() == [1]
    assert (index[(pt < 70) | (pt > 200)] == -1).all()


@pytest.mark.parametrize("edges", [[70.0], [80.0, 70.0], [70.0, 70.0, 80.0], [70.0, np.nan], [0.0, 10.0], []])
def test_bad_edges_are_refused(edges):
    with pytest.raises(InvalidArgument, match="pT bin edges"):
        check_edges(edges)


# -- the table against NumPy ---------------------------------------------------------------------------
def test_response_table_against_numpy(rng):
    real_pt, real_r = _jets(rng, 6000)
    gen_pt, gen_r = _jets(rng, 3001, lo=70.0, hi=200.0)
    table = response_table(real_pt, real_r, gen_pt, gen_r, bootstrap=100, seed=3)
    assert table["edges"] == list(DEFAULT_PT_EDGES) and len(table["bins"]) == 7
    outside = (real_pt < 70) | (real_pt > 200)
    assert table["outside"] == {"real": int(outside.sum()), "gen": 0}
    assert table["n"] == {"real": int((~outside).sum()), "gen": 3001}
    for b, entry in enumerate(table["bins"]):
        r, g = real_r[_in_bin(real_pt, b)], gen_r[_in_bin(gen_pt, b)]
        assert (entry["lo"], entry["hi"]) == (EDGES[b], EDGES[b + 1])
        assert entry["enough"]
        for side, values in (("real", r), ("gen", g)):
            got = entry[side]
            assert got["n"] == len(values)
            assert got["mean"] == pytest.approx(values.mean(), rel=1e-12)
            assert got["width"] == pytest.approx(values.std(), rel=1e-12)
            assert got["mean_err"] == pytest.approx(values.std() / np.sqrt(len(values)), rel=0.3)
            # the std's standard error for the sample's own kurtosis, s/2 sqrt((m4/s^4 - 1)/n), which is
            # what a bootstrap estimates (s / sqrt(2n) holds only for a kurtosis of exactly 3)
            kurtosis = np.mean((values - values.mean()) ** 4) / values.var() ** 2
            want = values.std() / 2 * np.sqrt((kurtosis - 1) / len(values))
            assert got["width_err"] == pytest.approx(want, rel=0.3)
            # the response drawn: N(1.2, 0.1) in every bin
            assert abs(got["mean"] - 1.2) < 5 * 0.1 / np.sqrt(len(values))
        assert entry["w"] == pytest.approx(wasserstein_distance(r, g), rel=1e-9)
        assert entry["ratio"] == pytest.approx(entry["w_half"] / entry["floor"])
        assert entry["floor"] > 0 and entry["w_err"] > 0 and entry["floor_err"] > 0
        pull = (g.mean() - r.mean()) / np.hypot(entry["real"]["mean_err"], entry["gen"]["mean_err"])
        assert entry["mean_pull"] == pytest.approx(pull)
        assert entry["mean_within_2sigma"] == (abs(pull) <= 2)
    # The same seed gives the same numbers.
    assert response_table(real_pt, real_r, gen_pt, gen_r, bootstrap=100, seed=3) == table


# -- verdicts ------------------------------------------------------------------------------------------
def test_an_identical_response_passes(rng):
    pt, r = _jets(rng, 4000, lo=70.0, hi=200.0)
    summary = response_table(pt, r, pt, r, bootstrap=30)["summary"]
    assert summary["bins_judged"] == 7 and summary["bins_too_few"] == 0
    assert summary["all_within_2sigma"] is True and summary["bins_outside_2sigma"] == []
    assert summary["max_mean_pull"] == 0 and summary["max_width_pull"] == 0


def test_a_resampled_response_stays_near_real(rng):
    real = _jets(rng, 4000, lo=70.0, hi=200.0)
    gen = _jets(rng, 4000, lo=70.0, hi=200.0)
    table = response_table(*real, *gen, bootstrap=50)
    # 14 pulls of one distribution: each beyond 5 sigma once in ~2 million draws
    assert table["summary"]["max_mean_pull"] < 5 and table["summary"]["max_width_pull"] < 5


@pytest.mark.parametrize("change", ["mean", "width"])
def test_a_shifted_or_widened_response_is_flagged(rng, change):
    real_pt, real_r = _jets(rng, 4000, lo=70.0, hi=200.0)
    gen_pt, gen_r = _jets(rng, 4000, lo=70.0, hi=200.0, **({"mean": 1.3} if change == "mean" else {"width": 0.15}))
    table = response_table(real_pt, real_r, gen_pt, gen_r, bootstrap=50)
    other = "width" if change == "mean" else "mean"
    for entry in table["bins"]:
        # expected pulls: 14 (mean) and 7 (width) sigma in the smallest bin
        assert entry[f"{change}_within_2sigma"] is False, entry
        assert abs(entry[f"{other}_pull"]) < 5, entry
    summary = table["summary"]
    assert summary[f"{change}_within_2sigma"] is False and summary["all_within_2sigma"] is False
    assert summary[f"{change}_bins_within"] == 0 and len(summary["bins_outside_2sigma"]) == 7
    assert summary["max_ratio"] > (6 if change == "mean" else 2.5)  # least of 40 draws: 11 and 4.3 at 3000 jets


def test_bins_with_too_few_jets_are_shown_but_not_judged(rng):
    pt, r = _jets(rng, 4000, lo=70.0, hi=200.0)
    first, last = _in_bin(pt, 0), _in_bin(pt, 6)
    # generated: the real jets, but 20 in the first bin with a response 0.5 too high, none in the last
    keep = ~first & ~last
    keep[np.flatnonzero(first)[:20]] = True
    gen_r = np.where(first, r + 0.5, r)
    table = response_table(pt, r, pt[keep], gen_r[keep], bootstrap=30)
    few, empty = table["bins"][0], table["bins"][6]
    assert not few["enough"] and few["gen"]["n"] == 20 and few["mean_within_2sigma"] is False
    assert not empty["enough"] and empty["gen"] == {"n": 0, "mean": None, "mean_err": None, "width": None,
                                                      "width_err": None}
    assert empty["ratio"] is None and empty["mean_within_2sigma"] is None
    summary = table["summary"]
    assert summary["bins_judged"] == 5 and summary["bins_too_few"] == 2
    assert summary["all_within_2sigma"] is True  # the shifted bin is not counted
    # A larger threshold leaves nothing to judge; no bootstrap, no verdict.
    assert response_table(pt, r, pt, r, bootstrap=30, min_jets=10_000)["summary"]["all_within_2sigma"] is None
    unjudged = response_table(pt, r, pt, gen_r, bootstrap=0)
    assert unjudged["summary"]["all_within_2sigma"] is None and unjudged["bins"][1]["mean_within_2sigma"] is None


# -- the reader keeps the kinematics -------------------------------------------------------------------
def _kinematic_file(path, images, labels, **datasets):
    """A jet file whose kinematic datasets are ``datasets`` instead of write_jet_file's pt and m0."""
    write_jet_file(path, images=images, labels=labels, chunk=7)
    with h5py.File(path, "a") as f:
        del f["pt"], f["m0"]
        for key, values in datasets.items():
            f[key] = values


@pytest.fixture(scope="module")
def small_jets(module_seed):
    images, labels = jet_images(61, seed=module_seed)
    return images, labels, compute_observables(images)["pt"].astype(np.float64)


def test_reader_keeps_kinematics_aligned_with_a_sparse_selection(small_jets, tmp_path, rng):
    images, labels, image_pt = small_jets
    rows = np.arange(61, dtype=np.float32)
    path = tmp_path / "jets.h5"
    _kinematic_file(path, images, labels, pt=rows + 1, m0=rows * 0.5, pt_gen=(2 * image_pt).astype(np.float32))
    picked = np.sort(rng.choice(61, size=23, replace=False))
    for sample in (read_jets(path, picked, chunk_jets=10, progress=False),
                   read_jets(path, max_jets=17, seed=int(rng.integers(1000)), chunk_jets=10, progress=False)):
        assert set(sample.scalars) == {"pt", "m0", "pt_gen"}
        np.testing.assert_array_equal(sample.scalars["pt"], sample.ids + 1)
        np.testing.assert_array_equal(sample.scalars["m0"], sample.ids * 0.5)
        # aligned with the observables, jet by jet
        np.testing.assert_allclose(sample.observables["pt"] / sample.scalars["pt_gen"], 0.5, rtol=1e-6)
    np.testing.assert_array_equal(read_jets(path, picked, progress=False).ids, picked)

    write_jet_file(tmp_path / "plain.h5", images=images[:5], labels=labels[:5])
    with h5py.File(tmp_path / "plain.h5", "a") as f:
        del f["pt"], f["m0"]
    assert read_jets(tmp_path / "plain.h5", progress=False).scalars == {}
    made = collect_jets([(images[:5], None)], 5, name="made", labelled=False, progress=False)
    assert made.scalars == {}


def test_reader_keeps_unusable_pt_values(small_jets, tmp_path):
    images, labels, _ = small_jets
    pt = np.full(61, 100.0, np.float32)
    pt[[3, 4, 5, 6]] = [np.nan, np.inf, 0.0, -5.0]
    _kinematic_file(tmp_path / "jets.h5", images, labels, pt=pt)
    np.testing.assert_array_equal(read_jets(tmp_path / "jets.h5", progress=False).scalars["pt"], pt)


@pytest.mark.parametrize("bad, message", [
    (np.ones(62, np.float32), r"pt_gen has shape \(62,\)"),
    (np.ones((61, 2), np.float32), r"pt_gen has shape \(61, 2\)"),
    (np.array([b"x"] * 61), "dtype"),
    ("group", "pt_gen is a group"),
])
def test_reader_refuses_malformed_kinematics(small_jets, tmp_path, bad, message):
    images, labels, _ = small_jets
    path = tmp_path / "jets.h5"
    _kinematic_file(path, images, labels, pt=np.ones(61, np.float32))
    with h5py.File(path, "a") as f:
        if isinstance(bad, str):
            f.create_group("pt_gen")
        else:
            f["pt_gen"] = bad
    with pytest.raises(JetFileError, match=message + r".*expected \(61,\) numbers"):
        read_jets(path, progress=False)


# -- the report ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def response_files(tmp_path_factory, module_seed):
    """Real and generated files of 300 jets each whose generator-level pT is image pT / R, R ~ N(1.2, 0.1);
    the generated one also in a version without pt_gen, the real one also without pt."""
    d = tmp_path_factory.mktemp("response")
    rng = np.random.default_rng(module_seed)
    for name, seed in (("real", module_seed + 1), ("gen", module_seed + 2)):
        images, labels = jet_images(300, seed=seed)
        p = compute_observables(images)["pt"] / rng.normal(1.2, 0.1, 300)
        if name == "real":
            p[:3] = [np.nan, 0.0, -1.0]
            _kinematic_file(d / "real.h5", images, labels, pt=p.astype(np.float32))
            _kinematic_file(d / "real_no_pt.h5", images, labels)
        else:
            _kinematic_file(d / "gen.h5", images, labels, pt=np.ones(300, np.float32), pt_gen=p.astype(np.float32))
            _kinematic_file(d / "gen_no_pt_gen.h5", images, labels, pt=np.ones(300, np.float32))
    # bins of about 70 jets: the quartiles of these synthetic jets' generator-level pT
    edges = (20.0, 50.0, 66.0, 86.0, 160.0)
    return d, edges


def _only_response_plots(monkeypatch):
    """The report's other plots are drawn and checked in test_evaluate.py; here they would take
    most of the time."""
    for name in ("plot_observables", "plot_classes", "plot_radial_profile", "plot_pixel_spectrum",
                 "plot_mean_images", "plot_jets"):
        monkeypatch.setattr(report, name, lambda *args, **kwargs: None)


def test_evaluate_reports_the_response(response_files, tmp_path, monkeypatch):
    d, edges = response_files
    _only_response_plots(monkeypatch)
    out = tmp_path / "out"
    m = evaluate(d / "real.h5", d / "gen.h5", out, bootstrap=10, progress=False, pt_edges=edges)
    response = m["response"]
    assert response["dropped"] == {"real": 3, "gen": 0}
    assert any("pt is NaN, infinite or not positive for 3 of 300 jets" in note for note in m["notes"])
    with h5py.File(d / "real.h5") as f:
        real_pt = f["pt"][3:].astype(np.float64)
    expected, _ = np.histogram(real_pt, edges)
    assert [b["real"]["n"] for b in response["bins"]] == expected.tolist()
    assert response["n"]["real"] + response["outside"]["real"] == 297
    assert response["summary"]["bins_judged"] >= 2
    for b in response["bins"]:
        for side in ("real", "gen"):
            if b[side]["n"] >= 30:
                assert abs(b[side]["mean"] - 1.2) < 6 * 0.1 / np.sqrt(b[side]["n"]), b

    stored = json.loads((out / "metrics.json").read_text())
    assert stored["response"]["bins"][1]["real"]["mean"] == pytest.approx(response["bins"][1]["real"]["mean"])
    assert stored["options"]["pt_edges"] == list(edges)
    assert {"response", "response_bins", "pt_spectrum"} <= set(m["plots"])
    for name in ("response", "response_bins", "pt_spectrum"):
        assert (out / m["plots"][name]).stat().st_size > 10_000, name
    md = (out / "report.md").read_text()
    assert "## Detector response" in md and "| 50–66 |" in md and "plots/response.png" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(m["plots"])


def test_no_pt_gen_no_response_and_no_real_pt_a_reason(response_files, tmp_path):
    d, edges = response_files
    m = evaluate(d / "real.h5", d / "gen_no_pt_gen.h5", tmp_path / "a", bootstrap=0, plots=False, progress=False)
    assert "response" not in m and not any("response" in note for note in m["notes"])
    assert "Detector response" not in (tmp_path / "a" / "report.md").read_text()

    m = evaluate(d / "real_no_pt.h5", d / "gen.h5", tmp_path / "b", bootstrap=0, plots=False, progress=False)
    assert "has no generator-level 'pt'" in m["response"]["skipped"]
    assert "Skipped: " in (tmp_path / "b" / "report.md").read_text().split("## Detector response")[1]


def test_cli_prints_the_response_line(response_files, tmp_path, capsys):
    from jetfast.cli import main

    d, edges = response_files
    code = main(["evaluate", "--real", str(d / "real.h5"), "--gen", str(d / "gen.h5"), "--out", str(tmp_path / "o"),
                 "--no-plots", "--bootstrap", "5", "--pt-edges", *map(str, edges)])
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("detector response")]
    assert len(lines) == 1 and "pT bins judged: mean within 2σ of real in" in lines[0], lines
    assert main(["evaluate", "--real", str(d / "real.h5"), "--gen", str(d / "gen.h5"), "--out", str(tmp_path / "p"),
                 "--pt-edges", "70"]) == 2
    assert "pT bin edges" in capsys.readouterr().err
