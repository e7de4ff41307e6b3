"""The code Transformer: shapes, KV-cached decoding against full re-forwards, the
sampler, and ``jetfast train-gpt`` on tiny synthetic code files."""

from __future__ import annotations

import json
import math
import os

import h5py
import numpy as np
import pytest
import torch

from jetfast.models.gpt import GPT, GPTConfig, decode_one_token, load_gpt, prefill
from jetfast.generation.sampler import sample
from jetfast.cli import main
from jetfast.run import RunDir
from tests.commands import assert_refused, interrupt_after_first_epoch, listing, run


def tiny_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = dict(vocab_size=37, seq_len=19, d_model=48, n_heads=3, n_layers=2, dropout=0.0)
    config.update(overrides)
    return GPT(GPTConfig(**config)).eval()


def write_codes_file(path, n=600, dims=8, num_bins=256, seed=0, quark_center=50, gluon_center=200, **replace):
    """Synthetic codes: quark (y=1) codes near ``quark_center``, gluon (y=0) near ``gluon_center``."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(np.float32)
    center = np.where(y == 1, quark_center, gluon_center)[:, None]
    codes = np.clip(center + rng.integers(-6, 7, (n, dims)), 0, num_bins - 1).astype(np.uint8)
    split = rng.choice(np.array([0] * 8 + [1, 2], np.uint8), n)
    datasets = {"codes": codes, "y": y, "split": split, "index": np.arange(n, dtype=np.int64)}
    datasets.update(replace)
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            if value is not None:
                f[key] = value
        f.attrs["num_bins"] = num_bins
        f.attrs["latent_dim"] = dims
    return path


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
def test_forward_shapes_and_config_checks():
    model = tiny_model()
    idx = torch.randint(0, 37, (5, 19))
    assert model(idx).shape == (5, 19, 37)
    assert model(idx[:, :1]).shape == (5, 1, 37)
    assert model.config.num_tokens == 37 + 2 + 1
    with pytest.raises(ValueError, match="exceed seq_len"):
        model(torch.zeros(2, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="n_heads"):
        GPTConfig(d_model=48, n_heads=5)
    with pytest.raises(RuntimeError, match="setup_caches"):
        model(idx[:, :1], pos=0)


def test_tied_weights_share_the_code_embedding():
    model = tiny_model(tie_weights=True)
    assert model.head is None
    hidden = {}
    model.ln_f.register_forward_hook(lambda module, args, out: hidden.update(out=out))
    logits = model(torch.randint(0, 37, (2, 7)))
    torch.testing.assert_close(logits, hidden["out"] @ model.tok_emb.weight[:37].T)
    assert model.num_parameters() < tiny_model().num_parameters()


@pytest.mark.parametrize("tie_weights, code_values", [(False, False), (True, False), (False, True)])
def test_kv_cached_greedy_equals_full_reforward(tie_weights, code_values, seed):
    """Token for token, and each step's logits to fp32 tolerance; the caches hold the full pass's k, v."""
    model = tiny_model(seed=seed, tie_weights=tie_weights, code_values=code_values)
    if code_values:
        centers = torch.sort(torch.randn(19, 37, dtype=torch.float64), dim=1).values
        model.set_code_values(centers, centers.mean(1), centers.std(1))
    batch, length = 5, model.config.seq_len
    labels = torch.tensor([0, 1, -1, 1, 0])
    with torch.inference_mode():
        model.setup_caches(batch)
        cached_logits = [prefill(model, model.class_tokens(labels))]
        tokens = [cached_logits[-1].argmax(-1)]
        for pos in range(1, length):
            cached_logits.append(decode_one_token(model, tokens[-1], pos))
            tokens.append(cached_logits[-1].argmax(-1))
        cached_codes = torch.stack(tokens, 1)

        # Reference: re-run the whole prefix at every step, no cache.
        model.clear_caches()
        seq = model.class_tokens(labels)[:, None]
        for pos in range(length):
            logits = model(seq)[:, -1]
            torch.testing.assert_close(cached_logits[pos], logits, rtol=1e-4, atol=1e-4)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
        assert torch.equal(seq[:, 1:], cached_codes)

        # The cache of layer 0 holds exactly the keys/values of the full pass.
        model.setup_caches(batch)
        prefill(model, seq[:, 0])
        for pos in range(1, length):
            decode_one_token(model, seq[:, pos], pos)
        stream = {}
        model.blocks[0].register_forward_pre_hook(lambda module, args: stream.update(x=args[0]))
        model(seq[:, :length])  # the residual stream entering layer 0 in a full pass
        qkv = model.blocks[0].attn.qkv(model.blocks[0].ln_1(stream["x"]))
        k = qkv.view(batch, length, 3, 3, 16)[:, :, 1].transpose(1, 2)
        torch.testing.assert_close(model.blocks[0].attn.kv_cache.k_cache, k, rtol=1e-5, atol=1e-5)
    # Greedy through the public sampler gives the same codes, in latent order.
    codes = sample(model, batch, cls=labels, greedy=True, batch_size=2)
    assert codes.dtype == torch.uint8 and torch.equal(codes.long(), model.to_latent(cached_codes))
    assert not code_values or not torch.equal(codes.long(), cached_codes)  # the order is not the identity


@pytest.mark.parametrize("tie_weights", [False, True])
def test_a_large_batch_decodes_from_packed_weights_that_follow_the_parameters(tie_weights, seed):
    """Above the matrix-vector rows the fp32 GEMMs read MKL packings of the weights, made at the
    prefill for the batch (the blocks' by the compiled step, the output head's here): the logits are
    the full pass's at every step, and a parameter changed between two samplings (an optimizer step)
    is packed again, not read stale."""
    model = tiny_model(seed=seed, tie_weights=tie_weights)
    batch = 23  # above MATVEC_MAX_ROWS, and no multiple of a SIMD width
    labels = torch.randint(-1, 2, (batch,), generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def cached_and_full(steps=7):
        with torch.inference_mode():
            model.setup_caches(batch)
            logits = prefill(model, model.class_tokens(labels))
            seq = torch.cat([model.class_tokens(labels)[:, None], torch.randint(0, 37, (batch, steps))], 1)
            cached = [logits] + [decode_one_token(model, seq[:, pos], pos) for pos in range(1, steps)]
            full = model(seq[:, :steps])
        for pos, step in enumerate(cached):
            torch.testing.assert_close(step, full[:, pos], rtol=1e-4, atol=1e-4)
        return model._sequence_packed, model._sequence_blocks

    packed, blocks = cached_and_full()
    if packed is None:
        pytest.skip("this torch has no MKL weight packing")
    assert packed[1].rows == batch
    if blocks is None:  # the PyTorch blocks, reading the packings made here
        assert len(packed[0]) == len(model.blocks) and all(p is not None and p.rows == batch for w in packed[0] for p in w)
    else:  # the compiled blocks, which pack their own
        assert packed[0] is None
    same = cached_and_full()  # the same batch and parameters: packed once
    assert same[0] is packed and same[1] is blocks
    model.train()
    loss = model(torch.randint(0, 37, (4, 19))).square().mean()
    loss.backward()
    optimizer.step()
    model.eval()
    again = cached_and_full()
    assert again[0] is not packed and (blocks is None or again[1] is not blocks)


def test_code_values_set_the_reading_order_and_enter_after_their_slot():
    """Dimensions are read widest first; the value of slot p's code is read at position p + 1
    (position 0 is the start token), and slot p's bin values shape the logits at position p,
    which predicts it."""
    model = tiny_model(code_values=True)
    centers = torch.sort(torch.randn(19, 37, dtype=torch.float64), dim=1).values
    std = torch.rand(19, dtype=torch.float64) + 0.1
    model.set_code_values(centers, centers.mean(1), std)
    assert torch.equal(model.order, torch.argsort(-std))
    widest = int(std.argmax())
    torch.testing.assert_close(model.values[0], ((centers[widest] - centers[widest].mean()) / std[widest]).float())
    codes = torch.randint(0, 37, (4, 19))
    assert torch.equal(model.to_sequence(codes)[:, 0], codes[:, widest])
    assert torch.equal(model.to_latent(model.to_sequence(codes)), codes)

    idx = torch.cat([model.class_tokens(torch.tensor([0, 1]))[:, None], torch.randint(0, 37, (2, 18))], 1)
    before = model(idx)
    with torch.no_grad():
        model.values[5] += 3.0  # slot 5's code sits at position 6
    after = model(idx)
    torch.testing.assert_close(after[:, :5], before[:, :5])
    assert not torch.allclose(after[:, 5], before[:, 5])
    assert not torch.allclose(after[:, 6:], before[:, 6:])
    with pytest.raises(ValueError, match="code_values"):
        tiny_model().set_code_values(centers, centers.mean(1), std)
    with pytest.raises(ValueError, match="do not match"):
        model.set_code_values(centers[:, :-1], centers.mean(1), std)
    with pytest.raises(ValueError, match="do not match"):
        model.set_code_values(centers, centers.mean(1), std[:-1])


@pytest.mark.parametrize("code_values", [False, True])
def test_prefill_of_several_tokens_matches_full_forward(code_values):
    """forward's cached pass sets the condition; the decode steps after it (which keep per-sequence
    terms of their own) follow it, also after a second prefill for other classes."""
    model = tiny_model(code_values=code_values)
    if code_values:
        centers = torch.sort(torch.randn(19, 37, dtype=torch.float64), dim=1).values
        model.set_code_values(centers, centers.mean(1), centers.std(1))
    for first in (torch.tensor([37, 38, 39]), torch.tensor([38, 39, 37])):
        idx = torch.cat([first[:, None], torch.randint(0, 37, (3, 5))], 1)
        with torch.inference_mode():
            model.setup_caches(3)
            cached = model(idx, pos=0)
            torch.testing.assert_close(cached, model(idx), rtol=1e-5, atol=1e-5)
            step = decode_one_token(model, torch.tensor([1, 2, 3]), 6)
            full = model(torch.cat([idx, torch.tensor([[1], [2], [3]])], 1))[:, -1]
            torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_the_class_reaches_every_position_and_a_decode_needs_its_prefill():
    model = tiny_model()
    codes = torch.randint(0, 37, (2, 18))
    quark = torch.cat([model.class_tokens(torch.tensor([1, 1]))[:, None], codes], 1)
    gluon = quark.clone()
    gluon[:, 0] = model.class_tokens(torch.tensor([0]))
    with torch.no_grad():
        # Start tokens with one embedding: only the class vectors tell quark from gluon here.
        model.tok_emb.weight[37:39] = 0.0
        model.class_emb.weight[0] = 0.0
        model.class_emb.weight[1] = 1.0
        assert not torch.allclose(model(quark)[:, -1], model(gluon)[:, -1])
        model.setup_caches(2)
        with pytest.raises(RuntimeError, match="prefill"):
            decode_one_token(model, codes[:, 0], 1)
        prefill(model, quark[:, 0])
        with pytest.raises(RuntimeError, match="prefill"):
            decode_one_token(model, codes[:1, 0], 1)  # another batch than the prefill's


# ---------------------------------------------------------------------------------------------
# the sampler
# ---------------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_and_independent_of_batch_size():
    model = tiny_model(seed=3)
    first = sample(model, 11, cls="quark", seed=1234, batch_size=11, top_p=0.95)
    assert first.shape == (11, 19) and first.dtype == torch.uint8
    assert torch.equal(first, sample(model, 11, cls="quark", seed=1234, batch_size=11, top_p=0.95))
    assert torch.equal(first, sample(model, 11, cls="quark", seed=1234, batch_size=4, top_p=0.95))
    assert not torch.equal(first, sample(model, 11, cls="quark", seed=1235, batch_size=11, top_p=0.95))
    assert int(first.max()) < 37


def test_small_caches_stay_for_the_next_call_and_large_ones_are_freed(monkeypatch):
    """Repeated calls of one batch size reuse the caches (and packed weights) of the last one, with
    the same codes; caches above the sampler's limit are freed when a call returns."""
    import jetfast.generation.sampler as sampler

    model = tiny_model(seed=5)
    first = sample(model, 20, cls="gluon", seed=7, batch_size=20)
    cache = model.blocks[0].attn.kv_cache
    assert cache is not None
    assert torch.equal(first, sample(model, 20, cls="gluon", seed=7, batch_size=20))
    assert model.blocks[0].attn.kv_cache is cache
    monkeypatch.setattr(sampler, "_KEPT_CACHE_BYTES", 2 * len(model.blocks) * cache.k_cache.nbytes - 1)
    assert torch.equal(first, sample(model, 20, cls="gluon", seed=7, batch_size=20))
    assert all(block.attn.kv_cache is None for block in model.blocks) and model._packed_weights is None


def test_top_k_and_top_p_restrict_the_draws():
    model = tiny_model(seed=4)
    with torch.inference_mode():
        model.setup_caches(64)
        logits = prefill(model, model.class_tokens(torch.full((64,), 1)))
        model.clear_caches()
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    first_codes = sample(model, 64, cls="quark", seed=0, top_k=3, temperature=5.0)[:, 0]
    assert set(first_codes.tolist()) <= allowed and len(set(first_codes.tolist())) > 1
    top_one = int(logits[0].argmax())
    nucleus = sample(model, 32, cls="quark", seed=0, top_p=1e-6)[:, 0]
    assert set(nucleus.tolist()) == {top_one}


def test_class_labels_per_jet():
    model = tiny_model(seed=5)
    mixed = sample(model, 6, cls=np.array([1, 0, -1, 1, 0, -1]), greedy=True)
    assert torch.equal(mixed[0], sample(model, 1, cls="quark", greedy=True)[0])
    assert torch.equal(mixed[1], sample(model, 1, cls=0, greedy=True)[0])
    assert torch.equal(mixed[2], sample(model, 1, cls=None, greedy=True)[0])
    assert sample(model, 0, cls="gluon").shape == (0, 19)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(top_k=38), ValueError, r"top_k must be an int in \[1, 37\]"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(cls="top"), ValueError, "unknown class"),
        (dict(cls=2), ValueError, "was not trained"),
        (dict(cls=torch.tensor([0, 1, 5])), ValueError, "was not trained"),
        (dict(cls=[0, 1]), ValueError, "2 per-jet class labels for n=3"),
        (dict(cls=True), TypeError, "not a bool"),
        (dict(batch_size=0), ValueError, "batch_size"),
    ],
)
def test_bad_sampler_arguments_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        sample(tiny_model(), 3, **kwargs)


def test_single_class_model_rejects_the_other_class():
    model = tiny_model(num_classes=1)
    with pytest.raises(ValueError, match="labels 0..0"):
        sample(model, 2, cls="quark")


# ---------------------------------------------------------------------------------------------
# train-gpt
# ---------------------------------------------------------------------------------------------
def run_train(*argv) -> int:
    """``jetfast train-gpt ARGV``; the exit status."""
    return main(["train-gpt", *map(str, argv)])


TINY = ["--d-model", "32", "--n-heads", "2", "--n-layers", "2", "--batch-size", "64", "--lr", "3e-3",
        "--dropout", "0", "--no-progress", "--num-threads", "1"]


def test_train_gpt_learns_the_classes_and_resumes(tmp_path, seed):
    codes_file = write_codes_file(tmp_path / "codes.h5", seed=seed)
    assert run_train(tmp_path, "--epochs", "12", "--max-steps", "80", *TINY) == 0
    gpt_dir = tmp_path / "gpt"
    for name in ("config.json", "metrics.jsonl", "README.txt", "checkpoints/last.pt", "checkpoints/best.pt",
                 "plots/loss.png"):
        assert (gpt_dir / name).is_file(), name
    config = json.loads((gpt_dir / "config.json").read_text())
    assert config["codes"] == str(codes_file.resolve()) and config["num_bins"] == 256
    metrics = RunDir(gpt_dir).read_metrics()
    assert metrics[-1]["step"] == 80
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"] - 1.0  # from ~ln(256) = 5.5 nats to well under
    assert math.isclose(metrics[-1]["val_bpd"], metrics[-1]["val_loss"] / math.log(2))

    model, model_config = load_gpt(gpt_dir)
    assert not model.training and model_config.seq_len == 8 and model_config.vocab_size == 256
    quark = sample(model, 200, cls="quark", seed=0).float()
    gluon = sample(model, 200, cls="gluon", seed=0).float()
    # Codes follow their class: quark near 50, gluon near 200 (the first code only knows the class token).
    assert abs(quark[:, 0].median().item() - 50) < 12 and abs(gluon[:, 0].median().item() - 200) < 12
    assert (quark - 50).abs().median() < 15 and (gluon - 200).abs().median() < 15
    unconditional = sample(model, 400, cls=None, seed=0).float()[:, 0]
    assert 0.2 < (unconditional < 125).float().mean() < 0.8  # both classes appear

    # Resume: more epochs continue from the saved step; metrics keep one line per epoch.
    assert run_train(tmp_path, "--epochs", "14", "--max-steps", "96", "--resume", "--no-progress") == 0
    resumed = RunDir(gpt_dir).read_metrics()
    assert [r["epoch"] for r in resumed] == list(range(len(resumed))) and resumed[-1]["step"] == 96
    assert resumed[-1]["val_loss"] < metrics[0]["val_loss"]


def test_train_gpt_with_code_values_reads_the_widest_dimension_first(tmp_path, seed):
    """The last latent dimension is the widest and the others follow it: read first, it makes
    the rest easy; the sampler hands the codes back in latent order."""
    rng = np.random.default_rng(seed)
    n, dims = 600, 8
    leader = rng.integers(0, 256, n)
    codes = np.clip(255 - leader[:, None] + rng.integers(-8, 9, (n, dims)), 0, 255)
    codes[:, -1] = leader
    scale = np.array([1.0] * (dims - 1) + [5.0])
    centers = (np.linspace(-1, 1, 256)[None] * scale[:, None]).astype(np.float32)
    write_codes_file(tmp_path / "codes.h5", n=n, dims=dims, seed=seed, codes=codes.astype(np.uint8), centers=centers)
    assert run_train(tmp_path, "--epochs", "30", "--max-steps", "240", *TINY) == 0
    model, config = load_gpt(tmp_path / "gpt")
    assert config.code_values and int(model.order[0]) == dims - 1
    generated = sample(model, 300, cls=None, seed=0).long()
    assert generated[:, -1].float().std() > 50  # the leader spreads over the bins, as in the data
    follow = (generated[:, :-1] + generated[:, -1:] - 255).abs().float()
    assert follow.median() < 20, follow.median()  # 75 if they did not follow


def test_draw_codes_are_the_nearest_bins_of_posterior_draws(seed):
    """Against a direct computation with the same noise: the nearest center (by brute force) of
    center(code) + std * N(0, 1); and the draws have the posterior's spread."""
    from jetfast.latent.codes import draw_codes

    rng = np.random.default_rng(seed)
    n, dims, bins = 3001, 5, 37  # odd sizes
    # Random spacings of at least 0.01: two centers a rounding apart would make every draw near
    # them ambiguous (sorted normals once came 2e-6 apart).
    spacings = rng.uniform(0.01, 0.2, (dims, bins))
    centers = (np.cumsum(spacings, axis=1) - spacings.sum(axis=1, keepdims=True) / 2).astype(np.float32)
    codes = torch.from_numpy(rng.integers(0, bins, (n, dims)).astype(np.uint8))
    std = torch.from_numpy(rng.uniform(0, 0.5, (n, dims)).astype(np.float32))
    std[:7] = 0  # a zero width keeps the code
    drawn = draw_codes(codes, std, torch.from_numpy(centers), torch.Generator().manual_seed(seed))
    assert drawn.dtype == codes.dtype and drawn.shape == codes.shape
    torch.testing.assert_close(drawn[:7], codes[:7])

    noise = torch.randn((n, dims), generator=torch.Generator().manual_seed(seed)).double().numpy()
    values = np.take_along_axis(centers.T[None], codes.numpy()[:, None, :].astype(np.int64), 1)[:, 0]
    latents = values + std.double().numpy() * noise
    distance = np.abs(latents[:, :, None] - centers[None].astype(np.float64))
    expected = distance.argmin(axis=2)
    gap = np.sort(distance, axis=2)[:, :, 1] - np.sort(distance, axis=2)[:, :, 0]
    clear = gap > 1e-5  # a draw within rounding of a bin edge may go either way
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(drawn.numpy()[clear], expected[clear])

    # Inside the bins' range the drawn values spread as the posterior does.
    inner = (values > centers[:, 5]) & (values < centers[:, -6]) & (std.numpy() > 0.2)
    shift = (np.take_along_axis(centers.T[None], drawn.numpy()[:, None, :].astype(np.int64), 1)[:, 0] - values)
    ratio = shift[inner] / std.numpy()[inner]
    assert abs(ratio.mean()) < 0.1 and 0.85 < ratio.std() < 1.2


def test_train_gpt_learns_the_posterior_around_the_codes(tmp_path, seed):
    """Every jet's code is the same bin; their posteriors are ~10 bins wide. Trained on draws
    (--posterior-draws), the Transformer samples codes with that spread; on the posterior means, it
    samples the one bin."""
    n, dims = 400, 4
    centers = np.tile(np.linspace(-1, 1, 256, dtype=np.float32), (dims, 1))
    width = 10 * (centers[0, 1] - centers[0, 0])
    write_codes_file(tmp_path / "codes.h5", n=n, dims=dims, seed=seed, codes=np.full((n, dims), 128, np.uint8),
                     centers=centers, posterior_std=np.full((n, dims), width, np.float16))
    generated = {}
    for name, extra in (("draws", ["--posterior-draws"]), ("means", [])):
        out = tmp_path / name
        assert run_train(tmp_path, "--out", out, "--epochs", "10", "--max-steps", "60", *TINY, *extra) == 0
        assert json.loads((out / "config.json").read_text())["posterior_draws"] == (name == "draws")
        model, _ = load_gpt(out)
        generated[name] = sample(model, 300, cls=None, seed=seed).float()
    spread, at_mean = generated["draws"].std(0), (generated["draws"] == 128).float().mean()
    assert ((spread > 7) & (spread < 13)).all() and at_mean < 0.15, (spread, at_mean)
    assert (generated["means"] == 128).float().mean() > 0.7


def test_train_gpt_resume_continues_exactly(tmp_path, monkeypatch):
    """A run stopped after an epoch and resumed ends with the metrics and weights of an uninterrupted
    run: the checkpoint holds the learning-rate schedule's state and the resumed run starts from it."""
    from jetfast.train.gpt import train_gpt

    # With the posterior's widths: the training codes are drawn afresh at every step, from noise the
    # resumed run must draw alike.
    centers = np.tile(np.linspace(-3, 3, 256, dtype=np.float32), (8, 1))
    write_codes_file(tmp_path / "codes.h5", n=300, centers=centers, posterior_std=np.full((300, 8), 0.1, np.float16))
    tiny = dict(d_model=32, n_heads=2, n_layers=2, batch_size=64, lr=3e-3, dropout=0.1, no_progress=True, num_threads=1,
                posterior_draws=True)
    straight = train_gpt(tmp_path, out=tmp_path / "straight", epochs=3, **tiny)

    with monkeypatch.context() as patch:
        interrupt_after_first_epoch(patch)
        with pytest.raises(KeyboardInterrupt):
            train_gpt(tmp_path, out=tmp_path / "resumed", epochs=3, **tiny)
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=False)
    assert state["epoch"] == 0 and state["scheduler"]["last_epoch"] == state["step"]
    resumed = train_gpt(tmp_path, out=tmp_path / "resumed", epochs=3, resume=True, no_progress=True)

    lines = [run.read_metrics() for run in (straight, resumed)]
    assert len(lines[0]) == len(lines[1]) == 3
    for a, b in zip(*lines):
        for key in ("epoch", "step", "train_loss", "val_loss", "val_bpd_uncond", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=0), key
    a, b = (torch.load(run.checkpoint("last"), weights_only=False)["model"] for run in (straight, resumed))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("extra, message", [
    (["--n-heads", "3"], "d_model must divide by n_heads"),
    (["--dropout", "2"], "invalid dropout"),
    (["--lr", "nan"], "a finite --lr > 0"),
    (["--warmup-steps", "-1"], "--warmup-steps >= 0"),
    (["--min-lr-ratio", "5"], "--min-lr-ratio in [0, 1]"),
])
def test_refused_train_gpt_options_create_nothing(tmp_path, capsys, extra, message):
    write_codes_file(tmp_path / "codes.h5", n=60)
    before = listing(tmp_path)
    assert_refused(*run(["train-gpt", tmp_path, "--epochs", "1", *TINY, *extra], capsys), "train-gpt", message)
    assert listing(tmp_path) == before


def test_fidelity_score_is_the_mean_wasserstein_over_the_real_spread(seed):
    """Against a direct computation: every observable shifted by half its spread scores 0.5; the
    same sample scores 0; one observable off alone weighs 1/len(OBSERVABLES)."""
    from scipy.stats import wasserstein_distance

    from jetfast.evaluate.observables import OBSERVABLES
    from jetfast.train.fidelity import fidelity_score

    rng = np.random.default_rng(seed)
    real = {name: rng.gamma(2.0, 1.0 + i, 501) for i, name in enumerate(OBSERVABLES)}
    assert fidelity_score(real, real) == 0.0
    shifted = {name: values + 0.5 * values.std() for name, values in real.items()}
    assert fidelity_score(real, shifted) == pytest.approx(0.5, rel=1e-9)
    other = dict(real, girth=rng.normal(3.0, 1.0, 333))
    expected = wasserstein_distance(other["girth"], real["girth"]) / real["girth"].std() / len(OBSERVABLES)
    assert fidelity_score(real, other) == pytest.approx(expected, rel=1e-9)


def test_train_gpt_without_a_vae_run_selects_by_the_loss(tmp_path, capsys):
    from jetfast.errors import InvalidArgument
    from jetfast.train.gpt import train_gpt

    write_codes_file(tmp_path / "codes.h5", n=60)
    with pytest.raises(InvalidArgument, match="--select must be fidelity or loss"):
        train_gpt(tmp_path, select="best", epochs=1)
    assert run_train(tmp_path, "--epochs", "1", *TINY) == 0
    assert "chosen by the validation loss" in capsys.readouterr().err
    assert json.loads((tmp_path / "gpt" / "config.json").read_text())["select"]["by"] == "loss"
    # Draws need the posterior's widths, which this file lacks.
    assert_refused(*run(["train-gpt", tmp_path, "--out", tmp_path / "draws", "--posterior-draws", "--epochs", "1",
                         *TINY], capsys), "train-gpt", "no posterior widths", "jetfast encode")
    assert not (tmp_path / "draws").exists()


def test_train_gpt_refuses_to_mix_runs(tmp_path, capsys):
    write_codes_file(tmp_path / "codes.h5", n=60)
    out = tmp_path / "elsewhere"
    assert run_train(tmp_path, "--out", out, "--epochs", "1", *TINY) == 0
    assert run_train(tmp_path, "--out", out, "--epochs", "1", *TINY) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "replace, match",
    [
        (dict(codes=np.full((60, 8), 200, np.uint8)), "outside the vocabulary"),  # num_bins=100 below
        (dict(y=None), r"lacks dataset\(s\) \['y'\]"),
        (dict(split=np.full(60, 3, np.uint8)), "split must hold"),
        (dict(y=np.full(60, 0.5, np.float32)), "y must be 1"),
        (dict(split=np.zeros(60, np.uint8)), "validation"),
        (dict(posterior_std=np.ones((60, 7), np.float16)), r"posterior_std has shape \(60, 7\)"),
        (dict(posterior_std=np.where(np.eye(60, 8), np.nan, 1).astype(np.float16)), "posterior_std must be finite"),
        (dict(posterior_std=-np.ones((60, 8), np.float16)), "posterior_std must be finite and >= 0; row 0"),
    ],
)
def test_train_gpt_bad_codes_files_are_clear_errors(tmp_path, capsys, replace, match):
    num_bins = 100 if "codes" in replace else 256
    write_codes_file(tmp_path / "codes.h5", n=60, num_bins=num_bins, quark_center=20, gluon_center=70, **replace)
    assert run_train(tmp_path, "--epochs", "1", *TINY) == 2
    err = capsys.readouterr().err
    assert "jetfast train-gpt: error:" in err
    assert __import__("re").search(match, err), err


def test_train_gpt_missing_codes_file_says_what_to_do(tmp_path, capsys):
    assert run_train(tmp_path, "--epochs", "1", *TINY) == 2
    assert "jetfast encode" in capsys.readouterr().err


@pytest.mark.slow
def test_train_gpt_under_torchrun_two_processes(tmp_path):
    """DDP on CPU (gloo): both ranks train on their shards, rank 0 writes the run directory."""
    import subprocess
    import sys
    from pathlib import Path

    write_codes_file(tmp_path / "codes.h5", n=200)
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "jetfast.cli",
         "train-gpt", str(tmp_path), "--epochs", "2", *TINY],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "gpt" / "config.json").read_text())
    metrics = RunDir(tmp_path / "gpt").read_metrics()
    assert config["world_size"] == 2 and len(metrics) == 2
    # Two ranks split each epoch: 2 x ceil((train // 2) / 64) steps in all.
    assert metrics[-1]["step"] == 2 * math.ceil((config["n_train"] // 2) / 64)
