"""The Pythia jet-image generator: detector model, jet selection, the written file, the CLI."""

from __future__ import annotations

import dataclasses
import os

import h5py
import numpy as np
import pytest

pytest.importorskip("pythia8mc")
pytest.importorskip("fastjet")

from jetfast.sim import simulate as sim  # noqa: E402
from jetfast.sim.detector import CMS_LIKE, ECAL, HCAL, TRACKS, Detector  # noqa: E402
from jetfast.data.kinematics import CELL_SIZE, cell_centers, jet_pt_mass  # noqa: E402
from jetfast.sim.pythia import Jets, JetSelection, Particles, cluster_jets, delta_r, select_jets  # noqa: E402
from tests.seeds import seed_of  # noqa: E402

EXACT = dataclasses.replace(CMS_LIKE, smear=False)
CENTER = 62
# This module's seed in the session (failures print it; the header says how to replay it).
SEED = seed_of("tests/test_simulate.py") % 100_000


def particle(pdgid, pt, deta, dphi, jet_eta=0.3, jet_phi=1.0, charge=0.0, mass=0.0):
    """One particle at (deta, dphi) from the jet axis, as render() arrays."""
    eta = jet_eta + deta
    e = np.sqrt((pt * np.cosh(eta)) ** 2 + mass**2)
    return dict(pt=[pt], eta=[eta], phi=[jet_phi + dphi], e=[e], pdgid=[pdgid], charge=[charge])


def render(detector, parts, jet_eta=0.3, jet_phi=1.0, rng=None):
    return detector.render(
        parts["pt"], parts["eta"], parts["phi"], parts["e"], parts["pdgid"], parts["charge"], jet_eta, jet_phi, rng=rng
    )


# ---------------------------------------------------------------- detector model


def test_photon_lights_one_ecal_cell():
    # 3.2 cells up in eta, 7.6 cells down in phi -> row 65, column 54
    parts = particle(22, 12.5, 3.2 * CELL_SIZE, -7.6 * CELL_SIZE)
    image = render(EXACT, parts)
    assert image.shape == (125, 125, 3) and image.dtype == np.float32
    assert np.count_nonzero(image) == 1
    expected_et = parts["e"][0] / np.cosh(parts["eta"][0])
    np.testing.assert_allclose(image[65, 54, ECAL], expected_et, rtol=1e-6)


def test_axis_falls_in_central_pixel_and_phi_wraps():
    # the jet sits just below +pi, the particle just above -pi: 0.05 apart in phi
    parts = particle(11, 8.0, 0.0, 0.0, jet_phi=np.pi - 0.02)
    parts["phi"] = [-np.pi + 0.03]
    image = render(EXACT, parts, jet_phi=np.pi - 0.02)
    col = int(np.floor(0.05 / CELL_SIZE + 62.5))
    assert image[CENTER, col, ECAL] > 0 and np.count_nonzero(image) == 1
    centered = render(EXACT, particle(22, 8.0, 0.4 * CELL_SIZE, -0.4 * CELL_SIZE))
    assert centered[CENTER, CENTER, ECAL] > 0


def test_neutral_hadron_fills_one_hcal_tower_with_et_over_25():
    parts = particle(2112, 30.0, 11.0 * CELL_SIZE, 0.2 * CELL_SIZE, mass=0.94)
    image = render(EXACT, parts)
    # row 73 -> tower rows 70..74; column 62 -> tower columns 60..64
    block = image[70:75, 60:65, HCAL]
    expected = np.float32(parts["e"][0] / np.cosh(parts["eta"][0]) / 25)
    np.testing.assert_allclose(block, expected, rtol=1e-6)
    assert np.count_nonzero(image[..., HCAL]) == 25
    assert np.count_nonzero(image[..., TRACKS]) == 0 and np.count_nonzero(image[..., ECAL]) == 0


def test_charged_hadron_muon_neutrino_and_thresholds():
    pion = particle(211, 9.0, -5.0 * CELL_SIZE, 20.0 * CELL_SIZE, charge=1.0, mass=0.14)
    image = render(EXACT, pion)
    np.testing.assert_allclose(image[57, 82, TRACKS], 9.0, rtol=1e-6)
    assert np.count_nonzero(image[..., TRACKS]) == 1 and np.count_nonzero(image[..., HCAL]) == 25

    soft = particle(-211, 0.3, 0.0, 0.0, charge=-1.0, mass=0.14)  # below the track threshold
    assert np.count_nonzero(render(EXACT, soft)[..., TRACKS]) == 0

    muon = render(EXACT, particle(13, 20.0, 0.0, 0.0, charge=-1.0, mass=0.106))
    assert np.count_nonzero(muon[..., TRACKS]) == 1 and not muon[..., 1:].any()

    assert not render(EXACT, particle(14, 50.0, 0.0, 0.0)).any()  # neutrinos are invisible
    assert not render(EXACT, particle(22, 0.05, 0.0, 0.0)).any()  # below the ECAL threshold
    assert not render(EXACT, particle(22, 50.0, 1.2, 0.0)).any()  # outside the image


def test_empty_and_bad_input():
    empty = EXACT.render([], [], [], [], [], [], 0.0, 0.0)
    assert empty.shape == (125, 125, 3) and not empty.any()
    with pytest.raises(ValueError, match="equal length"):
        EXACT.render([1.0], [0.0, 1.0], [0.0], [1.0], [22], [0], 0.0, 0.0)
    with pytest.raises(ValueError, match="rng"):
        CMS_LIKE.render([1.0], [0.0], [0.0], [1.0], [22], [0], 0.0, 0.0)


def grid_particles(count, pdgid, energy, stride, rng):
    """``count`` particles of one energy in distinct cells (or towers, stride 5) at random eta."""
    cells = rng.choice((125 // stride) ** 2, count, replace=False)
    rows, cols = cells // (125 // stride) * stride + stride // 2, cells % (125 // stride) * stride + stride // 2
    eta = (rows - 62) * CELL_SIZE + rng.uniform(-0.3, 0.3) * CELL_SIZE
    phi = (cols - 62) * CELL_SIZE
    pt = energy / np.cosh(eta)
    charge = np.zeros(count)
    return rows, cols, eta, (pt, eta, phi, np.full(count, energy), np.full(count, pdgid), charge)


def test_ecal_and_hcal_resolution_match_their_formulas():
    rng = np.random.default_rng(SEED)
    rows, cols, eta, parts = grid_particles(4000, 22, 20.0, 1, rng)
    image = CMS_LIKE.render(*parts, 0.0, 0.0, rng=rng)
    ratio = image[rows, cols, ECAL] * np.cosh(eta) / 20.0
    sigma = np.sqrt((0.03 / np.sqrt(20.0)) ** 2 + 0.005**2 + (0.04 / 20.0) ** 2)
    assert abs(ratio.mean() - 1) < 4 * sigma / np.sqrt(ratio.size), SEED
    assert abs(ratio.std() / sigma - 1) < 0.1, SEED

    rows, cols, eta, parts = grid_particles(600, 130, 80.0, 5, rng)
    image = CMS_LIKE.render(*parts, 0.0, 0.0, rng=rng)
    ratio = image[rows, cols, HCAL] * 25 * np.cosh(eta) / 80.0
    sigma = np.sqrt(1.0 / 80.0 + 0.05**2 + (0.25 / 80.0) ** 2)
    assert abs(ratio.mean() - 1) < 4 * sigma / np.sqrt(ratio.size), SEED
    assert abs(ratio.std() / sigma - 1) < 0.15, SEED


def test_noise_only_image_has_the_expected_rate_of_hits():
    from scipy.stats import norm

    rng = np.random.default_rng(SEED)
    images = np.stack([CMS_LIKE.render([], [], [], [], [], [], 0.7, 0.0, rng=rng) for _ in range(20)])
    assert not images[..., TRACKS].any()
    expected = norm.sf(CMS_LIKE.ecal_threshold / CMS_LIKE.ecal_noise)  # ~0.6% of cells
    rate = np.count_nonzero(images[..., ECAL]) / images[..., ECAL].size
    assert abs(rate - expected) < 5 * np.sqrt(expected / images[..., ECAL].size), (rate, expected, SEED)
    lit = images[..., ECAL] > 0
    # a hit holds at least the threshold energy, as E_T at its row's eta
    row_eta = 0.7 + cell_centers()
    assert (images[..., ECAL] * np.cosh(row_eta)[None, :, None] >= CMS_LIKE.ecal_threshold * (1 - 1e-5))[lit].all()
    hcal_rate = np.count_nonzero(images[..., HCAL]) / images[..., HCAL].size
    assert hcal_rate < 0.01


def test_smeared_images_are_never_negative():
    rng = np.random.default_rng(SEED)
    n = 3000
    parts = (
        rng.exponential(1.5, n), rng.uniform(-1, 1, n), rng.uniform(-1, 1, n), rng.exponential(2.0, n) + 0.2,
        rng.choice([22, 11, 211, -211, 130, 2112, 13], n), rng.choice([0.0, 1.0, -1.0], n),
    )
    image = CMS_LIKE.render(*parts, 0.0, 0.0, rng=rng)
    assert np.isfinite(image).all() and (image >= 0).all()
    hcal = image[..., HCAL].reshape(25, 5, 25, 5)
    assert (hcal == hcal[:, :1, :, :1]).all()


# ---------------------------------------------------------------- jets and labels


def test_cluster_jets_finds_two_separated_sprays():
    rng = np.random.default_rng(SEED)
    eta = np.concatenate([0.5 + rng.normal(0, 0.05, 20), -1.0 + rng.normal(0, 0.05, 15)])
    phi = np.concatenate([1.0 + rng.normal(0, 0.05, 20), -2.0 + rng.normal(0, 0.05, 15)])
    pt = np.concatenate([rng.uniform(2, 6, 20), rng.uniform(1, 3, 15)])
    particles = Particles(pt, eta, phi, pt * np.cosh(eta), np.full(35, 22), np.zeros(35, np.float32))
    jets = cluster_jets(particles)
    assert len(jets) == 2
    for group, j in ((slice(0, 20), 0), (slice(20, 35), 1)):
        px = (pt[group] * np.cos(phi[group])).sum()
        py = (pt[group] * np.sin(phi[group])).sum()
        pz = (pt[group] * np.sinh(eta[group])).sum()
        e = particles.e[group].sum()
        np.testing.assert_allclose(jets.pt[j], np.hypot(px, py), rtol=1e-9)
        np.testing.assert_allclose(jets.mass[j], np.sqrt(e**2 - px**2 - py**2 - pz**2), rtol=1e-6)
        np.testing.assert_allclose(jets.eta[j], np.arcsinh(pz / np.hypot(px, py)), rtol=1e-9)


def test_select_jets_matches_partons_and_window():
    selection = JetSelection(70, 200, 1.4)
    jets = Jets(pt=np.array([150.0, 90.0, 80.0]), eta=np.array([0.1, -0.5, 0.0]), phi=np.array([3.1, 0.0, 1.5]),
                mass=np.zeros(3))
    quarks = (np.array([2, -1]), np.array([0.2, -0.6]), np.array([-3.1, 0.1]))  # DeltaR across the phi seam
    np.testing.assert_array_equal(select_jets(jets, quarks, True, selection), [0, 1])
    np.testing.assert_array_equal(select_jets(jets, quarks, False, selection), [])  # wrong flavour
    mixed = (np.array([21, 3]), np.array([0.2, -0.6]), np.array([3.0, 0.5]))  # 2nd parton 0.5 away
    np.testing.assert_array_equal(select_jets(jets, mixed, False, selection), [0])
    narrow = JetSelection(100, 200, 1.4)
    np.testing.assert_array_equal(select_jets(jets, quarks, True, narrow), [0])
    assert delta_r(0.0, np.pi - 0.1, 0.0, -np.pi + 0.1) == pytest.approx(0.2)
    for bad in ((80, 70, 1.4), (0, 70, 1.4), (70, 200, 0.0), (70, 200, 3.0), (70, 9000, 1.0), (70, 200, 1.0, 0.0),
                (70, 200, 1.0, 1.5), (float("nan"), 200, 1.0)):
        with pytest.raises(ValueError):
            JetSelection(*bad)


# ---------------------------------------------------------------- the generated file

N_JETS = 224


@pytest.fixture(scope="module")
def jet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "jets.h5"
    sim.generate_jets(N_JETS, path, quark_fraction=0.5, seed=SEED, workers=2, progress=False)
    with h5py.File(path, "r") as f:
        data = {key: f[key][:] for key in ("X_jets", "y", "pt", "m0")}
        data["attrs"] = dict(f.attrs)
        data["chunks"] = f["X_jets"].chunks
        data["compression"] = f["X_jets"].compression
    return data


def test_file_layout_and_attributes(jet_file):
    assert jet_file["X_jets"].shape == (N_JETS, 125, 125, 3) and jet_file["X_jets"].dtype == np.float32
    for key in ("y", "pt", "m0"):
        assert jet_file[key].shape == (N_JETS,) and jet_file[key].dtype == np.float32
    assert jet_file["chunks"] == (32, 125, 125, 3) and jet_file["compression"] == "lzf"
    attrs = jet_file["attrs"]
    assert attrs["seed"] == SEED and attrs["n"] == N_JETS and attrs["events"] >= N_JETS / 2
    for name in ("version_jetfast", "version_pythia8mc", "version_fastjet", "pythia_settings_quark", "detector"):
        assert name in attrs
    assert "HardQCD:gg2gg = on" in attrs["pythia_settings_gluon"]
    assert "HardQCD:qq2qq = on" in attrs["pythia_settings_quark"]
    assert "PhaseSpace:pTHatMin = 49" in attrs["pythia_settings_quark"]  # 0.7 * 70 GeV


def test_labels_balanced_and_mixed(jet_file):
    y = jet_file["y"]
    assert set(np.unique(y)) == {0.0, 1.0}
    assert y.sum() == N_JETS // 2
    assert np.count_nonzero(np.diff(y)) > N_JETS / 4  # interleaved, not quarks then gluons


def test_pixels_physical(jet_file):
    images = jet_file["X_jets"]
    assert np.isfinite(images).all() and (images >= 0).all()
    hcal = images[..., HCAL].reshape(-1, 25, 5, 25, 5)
    assert (hcal == hcal[:, :, :1, :, :1]).all(), "HCAL must be constant on 5x5 towers"
    lit_per_channel = images.any(axis=(1, 2)).mean(axis=0)
    assert (lit_per_channel > 0.9).all(), lit_per_channel
    assert (jet_file["pt"] >= 70).all() and (jet_file["pt"] < 200).all()
    assert (jet_file["m0"] > 0).all()


def test_image_kinematics_match_fastjet_jet(jet_file):
    images, pt, m0 = jet_file["X_jets"], jet_file["pt"], jet_file["m0"]
    centers = cell_centers()
    cone = (np.hypot(centers[:, None], centers[None, :]) < 0.4)[None, :, :, None]
    pt_image, m_image = jet_pt_mass(images * cone)
    assert 0.9 < np.median(pt_image / pt) < 1.1
    assert np.corrcoef(pt_image, pt)[0, 1] > 0.8
    assert 0.6 < np.median(m_image / m0) < 1.3
    assert np.corrcoef(m_image, m0)[0, 1] > 0.6


def test_gluon_jets_wider_and_busier_than_quark_jets(jet_file):
    images, y = jet_file["X_jets"], jet_file["y"]
    centers = cell_centers()
    radius = np.hypot(centers[:, None], centers[None, :])
    energy = images.sum(-1)
    girth = (energy * radius).sum((1, 2)) / energy.sum((1, 2))
    lit = np.count_nonzero(images, axis=(1, 2, 3))
    quark, gluon = y == 1, y == 0
    assert girth[gluon].mean() > girth[quark].mean(), (girth[gluon].mean(), girth[quark].mean())
    assert lit[gluon].mean() > 1.1 * lit[quark].mean(), (lit[gluon].mean(), lit[quark].mean())


def test_same_seed_same_file_whatever_the_workers(tmp_path):
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    settings = dict(quark_fraction=0.3, seed=SEED + 1, compression="gzip", chunk=7, progress=False)
    sim.generate_jets(37, one, workers=1, **settings)
    sim.generate_jets(37, two, workers=2, **settings)
    with h5py.File(one, "r") as a, h5py.File(two, "r") as b:
        for key in ("X_jets", "y", "pt", "m0"):
            np.testing.assert_array_equal(a[key][:], b[key][:], err_msg=f"{key} (seed {SEED + 1})")
        assert a["y"][:].sum() == round(37 * 0.3)
        assert a["X_jets"].compression == "gzip" and a["X_jets"].shuffle and a["X_jets"].chunks[0] == 7
        assert a.attrs["events"] == b.attrs["events"]
    assert sorted(os.listdir(tmp_path)) == ["one.h5", "two.h5"]


def test_uncompressed_is_contiguous_and_single_flavour(tmp_path):
    path = sim.generate_jets(5, tmp_path / "g.h5", quark_fraction=0.0, seed=SEED, workers=1,
                             compression="none", progress=False)
    with h5py.File(path, "r") as f:
        assert f["X_jets"].chunks is None and f["X_jets"].compression is None
        assert not f["y"][:].any()


def test_failed_run_leaves_no_file(tmp_path, monkeypatch):
    real = sim.simulate_unit
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(*args)

    monkeypatch.setattr(sim, "simulate_unit", failing)
    out = tmp_path / "jets.h5"
    with pytest.raises(RuntimeError, match="simulated crash"):
        sim.generate_jets(40, out, seed=SEED, workers=1, progress=False)
    assert os.listdir(tmp_path) == []


@dataclasses.dataclass(frozen=True)
class BrokenDetector(Detector):
    def render(self, *args, **kwargs):
        raise RuntimeError("detector failure")


def test_worker_failure_stops_the_run_and_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError, match="detector failure"):
        sim.generate_jets(64, tmp_path / "jets.h5", seed=SEED, workers=2, detector=BrokenDetector(), progress=False)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("delay", [0.0, 0.15, 0.3, 0.6, 1.0])
def test_ctrl_c_says_interrupted_and_leaves_no_file(tmp_path, delay):
    """Ctrl-C reaches the whole process group, workers included, at any moment: while they start
    (before they ignore SIGINT), while they run, while the pool is being stopped."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "jets.h5"
    command = [sys.executable, "-m", "jetfast.cli", "data", "generate", "--n", "64", "--workers", "2", "--out", str(out)]
    # The child must see Ctrl-C even when this suite runs in the background, where the shell
    # starts it (and so its children) with SIGINT ignored.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"),
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not list(tmp_path.glob("jets.h5.tmp-*")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # the temporary file exists just before the workers start
    time.sleep(delay)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert [line for line in err.splitlines() if line.strip() and "simulating jets" not in line] == ["interrupted"], err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(n=0), ValueError, "positive"),
        (dict(n=-3), ValueError, "positive"),
        (dict(n=2.5), ValueError, "positive"),
        (dict(quark_fraction=1.5), ValueError, r"\[0, 1\]"),
        (dict(quark_fraction=-0.1), ValueError, r"\[0, 1\]"),
        (dict(pt_min=200.0, pt_max=100.0), ValueError, "pt_min < pt_max"),
        (dict(pt_min=100.0, pt_max=100.0), ValueError, "pt_min < pt_max"),
        (dict(eta_max=4.0), ValueError, "eta_max"),
        (dict(pthat_min_fraction=1.2), ValueError, "pthat_min_fraction"),
        (dict(compression="zip"), ValueError, "compression"),
        (dict(chunk=0), ValueError, "chunk"),
        (dict(workers=0), ValueError, "workers"),
        (dict(seed=-1), ValueError, "seed"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error, message):
    arguments = dict(n=10, out=tmp_path / "x.h5", progress=False) | kwargs
    with pytest.raises(error, match=message):
        sim.generate_jets(arguments.pop("n"), arguments.pop("out"), **arguments)
    assert os.listdir(tmp_path) == []


def test_bad_output_paths(tmp_path):
    existing = tmp_path / "old.h5"
    existing.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        sim.generate_jets(5, existing, progress=False)
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sim.generate_jets(5, tmp_path / "missing" / "x.h5", progress=False)
    with pytest.raises(IsADirectoryError):
        sim.generate_jets(5, tmp_path, progress=False, overwrite=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to any directory")
def test_unwritable_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(PermissionError, match="cannot write"):
        sim.generate_jets(5, locked / "x.h5", progress=False)


# ---------------------------------------------------------------- command line


def cli(argv):
    """``jetfast data generate ARGV``; the exit status."""
    from jetfast.cli import main

    return main(["data", "generate", *argv])


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--n", "--out", "--quark-fraction", "--seed", "--workers", "--compression", "--pt-min", "--eta-max"):
        assert option in text


def test_cli_runs_and_reports_errors(tmp_path, capsys):
    out = tmp_path / "cli.h5"
    argv = ["--n", "3", "--out", str(out), "--seed", str(SEED), "--workers", "1", "--pthat-min-fraction", "0.8", "--quiet"]
    assert cli(argv) == 0
    assert "wrote 3 jets" in capsys.readouterr().out
    assert cli(["--n", "3", "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli(["--n", "0", "--out", str(tmp_path / "y.h5"), "--quiet"]) == 2
    assert "positive" in capsys.readouterr().err
    assert cli(["--n", "3", "--out", str(tmp_path / "z.h5"), "--pt-min", "300", "--pt-max", "100", "--quiet"]) == 2
    assert "pt_min < pt_max" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["cli.h5"]
