"""Jets for a given pT and mass: the codes carry them, the Transformer is conditioned on them,
`sample` and `generate` ask for them, and generated files say what was asked."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch

from jetfast.cli import main
from jetfast.errors import InvalidArgument
from jetfast.generation.conditions import Conditions, parse_value_or_range
from jetfast.generation.sampler import sample
from jetfast.models.gpt import GPT, GPTConfig, decode_one_token, load_gpt, prefill
from jetfast.run import save_checkpoint
from tests.test_gpt import TINY, run_train, write_codes_file


def kinematic_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = dict(vocab_size=37, seq_len=11, d_model=48, n_heads=3, n_layers=2, code_values=True, kinematic=True,
                  value_shift=True)
    config.update(overrides)
    model = GPT(GPTConfig(**config)).eval()
    model.set_kinematics(torch.tensor([70.0, 120.0, 200.0]), torch.tensor([2.0, 10.0, 40.0]))
    centers = torch.randn(config["seq_len"], config["vocab_size"]).sort(dim=1).values
    model.set_code_values(centers, torch.zeros(config["seq_len"]), torch.ones(config["seq_len"]))
    with torch.no_grad():  # an untrained embedding is near zero: make the conditioning matter
        for layer in model.kinematic_emb:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, 0.5)
        if model.config.value_shift:
            model.value_shift.normal_(0.0, 1.0)
    return model


def test_the_training_range_and_standardisation_are_saved_with_the_model(tmp_path):
    model = kinematic_model()
    assert model.kinematic_range.tolist() == [[70.0, 200.0], [2.0, 40.0]]
    features = torch.stack([torch.log(torch.tensor([70.0, 120, 200])), torch.log1p(torch.tensor([2.0, 10, 40]))], 1)
    torch.testing.assert_close(model.kinematic_mean, features.mean(0))
    torch.testing.assert_close(model.kinematic_std, features.std(0))
    save_checkpoint({"model": model.state_dict(), "config": vars(model.config)}, tmp_path / "checkpoints" / "best.pt")
    loaded, config = load_gpt(tmp_path)
    assert config.kinematic and torch.equal(loaded.kinematic_range, model.kinematic_range)


def test_cached_decode_with_kinematics_equals_the_full_forward(rng):
    """Every step of a cached decode gives the logits of a full causal pass with the same requests,
    including jets with only one of the two values given (NaN)."""
    model = kinematic_model()
    batch = 5
    kinematics = torch.tensor([[80.0, 5.0], [150.0, float("nan")], [float("nan"), 30.0],
                               [float("nan"), float("nan")], [199.0, 39.0]])
    labels = torch.tensor([1, 0, -1, 1, 0])
    codes = torch.from_numpy(rng.integers(0, 37, (batch, 11)))
    idx = torch.cat([model.class_tokens(labels)[:, None], codes[:, :-1]], 1)
    with torch.no_grad():
        full = model(idx, kinematics=kinematics)
        model.setup_caches(batch)
        steps = [prefill(model, idx[:, 0], kinematics)]
        for pos in range(1, 11):
            steps.append(decode_one_token(model, idx[:, pos], pos))
        model.clear_caches()
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_requests_change_the_logits_and_a_missing_value_is_not_a_zero():
    model = kinematic_model()
    tokens = model.class_tokens(torch.tensor([1, 1, 1]))[:, None]
    with torch.no_grad():
        logits = model(tokens, kinematics=torch.tensor([[80.0, 10.0], [190.0, 10.0], [float("nan"), 10.0]]))[:, 0]
        none = model(tokens[:1])[:, 0]
        all_missing = model(tokens[:1], kinematics=torch.full((1, 2), float("nan")))[:, 0]
    assert (logits[0] - logits[1]).abs().max() > 1e-3  # pT reaches the logits
    assert (logits[2] - logits[0]).abs().max() > 1e-3 and (logits[2] - logits[1]).abs().max() > 1e-3
    torch.testing.assert_close(none, all_missing)  # nothing given == every value NaN


def test_sample_takes_scalars_or_per_jet_values_and_is_reproducible_per_jet():
    model = kinematic_model()
    pt = np.array([75.0, 100.0, 150.0, 180.0, 199.0, 120.0, 90.0])
    whole = sample(model, 7, cls="quark", pt=pt, mass=12.0, seed=3, batch_size=7)
    pieces = sample(model, 7, cls="quark", pt=pt, mass=12.0, seed=3, batch_size=3)
    assert torch.equal(whole, pieces)
    again = sample(model, 7, cls="quark", pt=torch.from_numpy(pt), mass=[12.0] * 7, seed=3)
    assert torch.equal(whole, again)
    other = sample(model, 7, cls="quark", pt=pt[::-1].copy(), mass=12.0, seed=3)
    assert not torch.equal(whole, other)


@pytest.mark.parametrize("kwargs, match", [
    ({"pt": 250.0}, r"pt = 250 GeV .* outside the range .* 70 to 200 GeV; pass allow_extrapolation"),
    ({"mass": 60.0}, r"mass = 60 GeV .* outside the range .* 2 to 40 GeV"),
    ({"pt": [100.0, 120.0]}, r"got 2 per-jet values of pt for n=3"),
    ({"pt": -5.0}, r"pt must be finite and > 0"),
    ({"pt": float("inf")}, r"pt must be finite"),
])
def test_bad_requests_are_refused(kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        sample(kinematic_model(), 3, seed=0, **kwargs)


def test_extrapolation_only_when_allowed():
    model = kinematic_model()
    codes = sample(model, 3, pt=400.0, mass=80.0, seed=0, allow_extrapolation=True)
    assert codes.shape == (3, 11)


def test_a_class_only_model_refuses_kinematic_requests():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=37, seq_len=11, d_model=48, n_heads=3, n_layers=1)).eval()
    with pytest.raises(InvalidArgument, match="trained without pT/mass conditioning"):
        sample(model, 2, pt=100.0, seed=0)


def test_value_or_range_parsing():
    assert parse_value_or_range("150", "--pt") == 150.0
    assert parse_value_or_range("100:200", "--pt") == (100.0, 200.0)
    for bad in ("abc", "200:100", "1:2:3", ""):
        with pytest.raises(InvalidArgument, match="--pt takes a value in GeV"):
            parse_value_or_range(bad, "--pt")


def test_flat_ranges_are_drawn_per_block_reproducibly():
    conditions = Conditions(cls="mix", pt=(100.0, 200.0), mass=20.0)
    labels, pt, mass = conditions.block(0, 4000, seed=11)
    assert pt.min() >= 100 and pt.max() <= 200 and abs(pt.mean() - 150) < 3
    np.testing.assert_array_equal(mass, 20.0)
    assert set(labels.tolist()) == {0, 1}
    again = conditions.block(0, 4000, seed=11)
    np.testing.assert_array_equal(pt, again[1])
    assert conditions.written == ("pt_gen", "m0_gen")
    assert Conditions(pt=150.0).written == ("pt_gen",)
    with pytest.raises(InvalidArgument, match="drop --pt and --mass"):
        Conditions(pt=150.0, like=object())


# ---------------------------------------------------------------------------------------------
# train-gpt on codes that carry pt and m0
# ---------------------------------------------------------------------------------------------
def test_train_gpt_learns_the_pt_dependence(tmp_path, seed):
    """The first code follows log pT: the conditioned model puts it where the pT says, the
    unconditioned draw spreads over all of them."""
    rng = np.random.default_rng(seed)
    n, dims = 800, 6
    pt = np.exp(rng.uniform(np.log(70), np.log(200), n)).astype(np.float32)
    m0 = rng.uniform(1, 40, n).astype(np.float32)
    leader = np.round((np.log(pt) - np.log(70)) / (np.log(200) - np.log(70)) * 200 + 20).astype(int)
    codes = np.clip(leader[:, None] + rng.integers(-4, 5, (n, dims)), 0, 255).astype(np.uint8)
    centers = np.tile(np.linspace(-1, 1, 256, dtype=np.float32), (dims, 1))
    write_codes_file(tmp_path / "codes.h5", n=n, dims=dims, seed=seed, codes=codes, centers=centers, pt=pt, m0=m0)
    assert run_train(tmp_path, "--epochs", "40", "--max-steps", "260", *TINY) == 0
    model, config = load_gpt(tmp_path / "gpt")
    assert config.kinematic
    run_config = json.loads((tmp_path / "gpt" / "config.json").read_text())
    with h5py.File(tmp_path / "codes.h5", "r") as f:
        train = f["split"][...] == 0
    assert run_config["kinematics"]["pt_gev"] == pytest.approx([pt[train].min(), pt[train].max()])
    spreads = []
    for request in (80.0, 130.0, 190.0):
        expected = (math.log(request) - math.log(70)) / (math.log(200) - math.log(70)) * 200 + 20
        first = sample(model, 200, cls=None, pt=request, seed=1).float()[:, 0]
        assert abs(first.median().item() - expected) < 20, (request, first.median().item(), expected)
        spreads.append(first.std().item())
    free = sample(model, 400, cls=None, seed=2).float()[:, 0]
    # The pT is free: the leader spreads over the data's range (std ~58 in the data; a briefly
    # trained model gets 35-60), more than at any one requested pT (15-25).
    assert free.std() > 25 and free.std() > 1.3 * max(spreads), (free.std(), spreads)


def test_train_gpt_without_kinematics_in_the_codes_is_class_only(tmp_path, seed, capsys):
    write_codes_file(tmp_path / "codes.h5", seed=seed)
    assert run_train(tmp_path, "--epochs", "1", "--max-steps", "2", *TINY) == 0
    assert "conditioned on the class only" in capsys.readouterr().err
    assert not load_gpt(tmp_path / "gpt")[1].kinematic


# ---------------------------------------------------------------------------------------------
# generate: --pt, --mass, --like
# ---------------------------------------------------------------------------------------------
LATENT, BINS = 16, 32


@pytest.fixture(scope="module")
def kinematic_run(tmp_path_factory):
    """A complete run layout whose Transformer is conditioned on pT and mass (weights untrained:
    generation mechanics only), and a jet file of 40 jets to mirror."""
    from dataclasses import asdict

    from jetfast.data.transforms import IntensityTransform
    from jetfast.models.vae import VAE, VAEConfig
    from tests.jetfiles import write_jet_file

    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    vae_config = VAEConfig(latent_dim=LATENT, widths=(4, 8, 8, 8))
    transform = IntensityTransform(scale=(1.0, 0.5, 0.02), mean=(0.01, 0.02, 0.03), std=(0.2, 0.3, 0.4))
    save_checkpoint({"model": VAE(vae_config).state_dict(), "vae_config": vae_config.to_dict(),
                     "transform": transform.to_dict()}, run / "checkpoints" / "best.pt")
    centers = np.sort(np.random.default_rng(0).normal(size=(LATENT, BINS)).astype(np.float32), axis=1)
    np.savez(run / "bins.npz", centers=centers)
    config = GPTConfig(vocab_size=BINS, seq_len=LATENT, d_model=32, n_heads=2, n_layers=1, kinematic=True)
    model = GPT(config)
    model.set_kinematics(torch.tensor([60.0, 250.0]), torch.tensor([0.0, 80.0]))
    save_checkpoint({"model": model.state_dict(), "config": asdict(config)}, run / "gpt" / "checkpoints" / "best.pt")
    like = run / "like.h5"
    write_jet_file(like, n=40, seed=1)
    with h5py.File(like, "r+") as f:  # pT and mass inside the trained range
        f["pt"][...] = np.linspace(70, 240, 40, dtype=np.float32)
        f["m0"][...] = np.linspace(1, 70, 40, dtype=np.float32)
    np.savez(run / "split.npz", train=np.arange(0, 30), val=np.arange(30, 35), test=np.arange(35, 40))
    return run, like


def read_all(path) -> dict:
    with h5py.File(path, "r") as f:
        return {key: f[key][()] for key in f}, dict(f.attrs)


def test_generate_at_a_pt_writes_what_was_asked(kinematic_run, tmp_path):
    from jetfast.generation.writer import generate_file

    run, _ = kinematic_run
    data, attrs = read_all(generate_file(run, 9, tmp_path / "a.h5", pt=150.0, batch_size=4, progress=False))
    assert set(data) == {"X_jets", "y", "pt", "m0", "pt_gen"}
    np.testing.assert_array_equal(data["pt_gen"], 150.0)
    assert "pt_gen" in attrs["kinematics_meaning"]
    flat, _ = read_all(generate_file(run, 9, tmp_path / "b.h5", pt=(100.0, 200.0), mass=20.0, batch_size=4,
                                     progress=False))
    assert set(flat) >= {"pt_gen", "m0_gen"} and 100 <= flat["pt_gen"].min() and flat["pt_gen"].max() <= 200
    assert len(np.unique(flat["pt_gen"])) == 9
    np.testing.assert_array_equal(flat["m0_gen"], 20.0)
    again, _ = read_all(generate_file(run, 9, tmp_path / "c.h5", pt=(100.0, 200.0), mass=20.0, batch_size=4,
                                      progress=False))
    for key in flat:
        np.testing.assert_array_equal(flat[key], again[key])


def test_generate_like_mirrors_a_file_one_to_one(kinematic_run, tmp_path):
    run, like = kinematic_run
    out = tmp_path / "like.h5"
    assert main(["generate", str(run), "--like", str(like), "--out", str(out), "--batch-size", "16"]) == 0
    data, _ = read_all(out)
    with h5py.File(like, "r") as f:
        np.testing.assert_array_equal(data["y"], f["y"][...])
        np.testing.assert_array_equal(data["pt_gen"], f["pt"][...])
        np.testing.assert_array_equal(data["m0_gen"], f["m0"][...])
    assert data["X_jets"].shape == (40, 125, 125, 3)
    # Only the run's test jets, in file order; and the first jets of a larger request are the same jets.
    test = tmp_path / "test.h5"
    assert main(["generate", str(run), "--like", str(like), "--like-split", "test", "--out", str(test)]) == 0
    part, _ = read_all(test)
    np.testing.assert_array_equal(part["pt_gen"], np.linspace(70, 240, 40, dtype=np.float32)[35:])
    head = tmp_path / "head.h5"
    assert main(["generate", str(run), "--like", str(like), "--n", "16", "--out", str(head), "--batch-size", "16"]) == 0
    np.testing.assert_array_equal(read_all(head)[0]["X_jets"], data["X_jets"][:16])


@pytest.mark.parametrize("argv, message", [
    (["--pt", "400"], "outside the range of the jets the model was trained on"),
    (["--pt", "abc"], "--pt takes a value in GeV or a range LO:HI"),
    (["--pt", "100", "--like", "{like}"], "drop --pt and --mass"),
    (["--like", "{like}", "--n", "41"], "has 40 jets to mirror; asked for 41"),
    (["--like-split", "test", "--n", "3"], "give --like FILE too"),
    ([], "give the number of jets with --n"),
])
def test_refused_requests_create_nothing(kinematic_run, tmp_path, capsys, argv, message):
    run, like = kinematic_run
    out = tmp_path / "out.h5"
    argv = [a.replace("{like}", str(like)) for a in argv]
    if "--n" not in argv and "--like" not in argv and argv:
        argv += ["--n", "3"]
    assert main(["generate", str(run), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_extrapolation_when_allowed(kinematic_run, tmp_path):
    run, _ = kinematic_run
    out = tmp_path / "far.h5"
    assert main(["generate", str(run), "--n", "2", "--pt", "400", "--allow-extrapolation", "--out", str(out)]) == 0
    np.testing.assert_array_equal(read_all(out)[0]["pt_gen"], 400.0)


# -- a VAE conditioned on the jets ---------------------------------------------------------------
def conditioned_vae(latent=LATENT, seed=0):
    from jetfast.models.vae import VAE, VAEConfig

    torch.manual_seed(seed)
    config = VAEConfig(latent_dim=latent, widths=(4, 8, 8, 8), conditioned=True, channel_totals=True,
                       condition_mean=(0.5, 4.8, 2.5), condition_std=(0.5, 0.4, 0.8))
    model = VAE(config).eval()
    with torch.no_grad():  # make the conditions matter to an untrained decoder
        model.from_latent.weight[:, latent:].normal_(0.0, 3.0)
    return model


def test_a_conditioned_vae_decodes_for_the_jet_it_is_given():
    from jetfast.data.transforms import IntensityTransform

    model = conditioned_vae()
    transform = IntensityTransform(scale=(1.0, 0.5, 0.02), mean=(0.01, 0.02, 0.03), std=(0.2, 0.3, 0.4))
    z = torch.randn(3, LATENT)
    jets = torch.tensor([[1.0, 80.0, 5.0], [0.0, 150.0, 20.0], [1.0, 300.0, 40.0]])
    with torch.inference_mode():
        out = model.decode(z, jets)
        assert not torch.equal(out.pixels, model.decode(z, jets.flip(0)).pixels)
        assert torch.equal(model.images(z, transform, jets, seed=3), model.images(z, transform, jets, seed=3))
        mu, _ = model.encode(torch.randn(3, 3, 128, 128), jets)
        assert mu.shape == (3, LATENT)
        with pytest.raises(InvalidArgument, match=r"conditioned on the generator-level jets .* pass conditions="):
            model.decode(z)
        with pytest.raises(ValueError, match=r"conditions of shape \(3, 3\)"):
            model.decode(z, jets[:, :2])
        with pytest.raises(InvalidArgument, match="pt > 0 and m0 >= 0"):
            model.decode(z, torch.tensor([[1.0, 0.0, 5.0]] * 3))


def test_missing_conditions_are_drawn_from_the_training_jets_of_the_class():
    from jetfast.generation.conditions import NEIGHBOURS, complete

    rng = np.random.default_rng(0)
    table = np.stack([rng.integers(0, 2, 400), rng.uniform(50, 500, 400), rng.uniform(1, 60, 400)], 1)
    table = torch.from_numpy(table.astype(np.float32))
    labels = torch.tensor([1, 0, -1, 1, 0, -1] * 50)
    given_pt = np.where(np.arange(300) % 3 == 0, 150.0, np.nan)
    given_mass = np.where(np.arange(300) % 5 == 0, 20.0, np.nan)
    got_labels, pt, mass = complete(table, labels, given_pt, given_mass, seed=4)
    assert set(got_labels.tolist()) <= {0, 1} and torch.equal(got_labels[labels >= 0], labels[labels >= 0])
    assert (pt[np.isfinite(given_pt)] == 150).all() and (mass[np.isfinite(given_mass)] == 20).all()
    jets = table.double().numpy()
    for i in range(300):
        same_class = jets[jets[:, 0] == got_labels[i].item()]
        if np.isfinite(given_pt[i]) and not np.isfinite(given_mass[i]):
            # the mass-to-pT ratio of a same-class training jet among the nearest in pT
            ratios = same_class[:, 2] / same_class[:, 1]
            nearest = np.argsort(np.abs(same_class[:, 1] - 150))[: NEIGHBOURS + 2]
            assert np.isclose(ratios[nearest], mass[i] / 150, rtol=1e-9).any(), i
        elif not np.isfinite(given_pt[i]) and np.isfinite(given_mass[i]):
            nearest = np.argsort(np.abs(same_class[:, 2] - 20))[: NEIGHBOURS + 2]
            assert np.isin(pt[i], same_class[nearest, 1]), i
        elif not np.isfinite(given_pt[i]):
            assert ((same_class[:, 1] == pt[i]) & (same_class[:, 2] == mass[i])).any(), i
    again = complete(table, labels, given_pt, given_mass, seed=4)
    assert torch.equal(again[0], got_labels) and np.array_equal(again[1], pt) and np.array_equal(again[2], mass)
    assert not np.array_equal(complete(table, labels, given_pt, given_mass, seed=5)[2], mass)


@pytest.fixture(scope="module")
def conditioned_run(tmp_path_factory):
    """A run whose VAE is conditioned on the jets and whose Transformer is class-only."""
    from dataclasses import asdict

    from jetfast.data.transforms import IntensityTransform

    run = tmp_path_factory.mktemp("conditioned")
    vae = conditioned_vae()
    rng = np.random.default_rng(1)
    training_jets = torch.from_numpy(np.stack([rng.integers(0, 2, 60), rng.uniform(80, 300, 60),
                                               rng.uniform(2, 50, 60)], 1).astype(np.float32))
    transform = IntensityTransform(scale=(1.0, 0.5, 0.02), mean=(0.01, 0.02, 0.03), std=(0.2, 0.3, 0.4))
    save_checkpoint({"model": vae.state_dict(), "vae_config": vae.config.to_dict(), "transform": transform.to_dict(),
                     "training_jets": training_jets}, run / "checkpoints" / "best.pt")
    np.savez(run / "bins.npz", centers=np.sort(rng.normal(size=(LATENT, BINS)).astype(np.float32), axis=1))
    config = GPTConfig(vocab_size=BINS, seq_len=LATENT, d_model=32, n_heads=2, n_layers=1)
    save_checkpoint({"model": GPT(config).state_dict(), "config": asdict(config)}, run / "gpt" / "checkpoints" / "best.pt")
    return run, training_jets.double().numpy()


def test_generate_with_a_conditioned_vae_writes_the_jets_it_made(conditioned_run, tmp_path):
    from jetfast.generation.writer import generate_file

    run, training = conditioned_run
    data, _ = read_all(generate_file(run, 10, tmp_path / "a.h5", cls="unconditional", batch_size=4, progress=False))
    assert set(data) == {"X_jets", "y", "pt", "m0", "pt_gen", "m0_gen"}
    assert set(np.unique(data["y"])) <= {0.0, 1.0}
    for y, pt, m0 in zip(data["y"], data["pt_gen"], data["m0_gen"]):  # whole training jets
        assert ((training[:, 0] == y) & np.isclose(training[:, 1], pt) & np.isclose(training[:, 2], m0)).any()
    at, _ = read_all(generate_file(run, 6, tmp_path / "b.h5", cls="quark", pt=150.0, batch_size=4, progress=False))
    np.testing.assert_array_equal(at["pt_gen"], 150.0)
    np.testing.assert_array_equal(at["y"], 1.0)
    assert (at["m0_gen"] > 0).all() and (at["m0_gen"] < 150).all()
    again, _ = read_all(generate_file(run, 6, tmp_path / "c.h5", cls="quark", pt=150.0, batch_size=4, progress=False))
    for key in at:
        np.testing.assert_array_equal(at[key], again[key])


def test_a_conditioned_vae_checks_requests_against_its_training_jets(conditioned_run, tmp_path, capsys):
    run, _ = conditioned_run
    out = tmp_path / "far.h5"
    assert main(["generate", str(run), "--n", "2", "--pt", "1000", "--out", str(out)]) == 2
    assert "outside the range of the jets the model was trained on" in capsys.readouterr().err
    assert not out.exists()
    assert main(["generate", str(run), "--n", "2", "--pt", "1000", "--allow-extrapolation", "--out", str(out)]) == 0
