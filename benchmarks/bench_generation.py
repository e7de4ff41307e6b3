"""End-to-end generation on the CPU, sampling + decoding + writing: ms per jet with blocks of 1,
100 and 10,000 jets (the CaloChallenge's batch sizes) and generate's default blocks on 10,000 jets.

The pipeline at the default sizes (Transformer d_model 256, 4 layers, 8 heads over
128 codes of 256 bins, reading the codes' values; the VAE decoder train-vae builds by default,
conditioned on the jets, with the heads of the channel totals and hit counts, and its sampled
decode of the sparse observation model), with untrained weights: the cost
of every stage is the same as for a trained run, only the pictures differ.

Floor, per jet: sampling ~0.86 GFLOP (see bench_sample.py), decoding ~0.5 GFLOP
(the transposed convolutions), so ~1.4 GFLOP per jet, ~100 jets/s at the machine's
~140 GFLOP/s fp32 matmul rate; writing is ~190 kB of float32 per jet through LZF. With
``precision="bf16"`` the sampler's GEMMs and KV cache and the decoder run in bf16 (twice the
fp32 rate where the CPU has bf16 units); the pixel draws and the file stay fp32.
"""

import inspect
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch

from jetfast.data.transforms import IntensityTransform
from jetfast.generation.writer import JetGenerator, StageTimes, generate_file
from jetfast.models.gpt import GPT, GPTConfig
from jetfast.models.observation import hit_statistics
from jetfast.models.vae import VAE, VAEConfig, condition_features
from jetfast.run import save_checkpoint
from tests.jetfiles import jet_images

N_JETS = 10_000


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    images, labels = jet_images(64)
    transform = IntensityTransform.fit(images)
    # The decoder train-vae builds by default: conditioned on the jets, with the heads of the
    # channel totals (calorimeter coordinates, pixel shares) and of the hit counts.
    rng = np.random.default_rng(0)
    jets = torch.from_numpy(np.stack([labels, rng.uniform(70, 200, 64), rng.uniform(5, 80, 64)], 1).astype(np.float32))
    features = condition_features(jets).double()
    hits = hit_statistics(torch.from_numpy(images), totals_basis="calorimeter", pixel_shares=True)
    vae_config = VAEConfig(channel_totals=True, total_correlations=True, totals_basis="calorimeter", pixel_shares=True,
                           hit_counts=True, count_conditioned=True, count_calibrated=True, conditioned=True,
                           condition_mean=features.mean(0).tolist(), condition_std=features.std(0).tolist(),
                           hit_occupancy=hits["occupancy"], hit_log_mean=hits["log_mean"], hit_log_std=hits["log_std"],
                           total_log_mean=hits["total_log_mean"], total_log_std=hits["total_log_std"],
                           count_log_mean=hits["count_log_mean"], count_log_std=hits["count_log_std"])
    save_checkpoint(
        {"model": VAE(vae_config).state_dict(), "vae_config": vae_config.to_dict(), "transform": transform.to_dict(),
         "training_jets": jets},
        run / "checkpoints" / "best.pt",
    )
    centers = np.sort(np.random.default_rng(0).normal(size=(vae_config.latent_dim, 256)).astype(np.float32), axis=1)
    np.savez(run / "bins.npz", centers=centers)
    gpt_config = GPTConfig(vocab_size=256, seq_len=vae_config.latent_dim, d_model=256, n_heads=8, n_layers=4,
                           code_values=True)  # as train-gpt builds it
    gpt = GPT(gpt_config)
    table = torch.from_numpy(centers).double()
    gpt.set_code_values(table, table.mean(1), table.std(1))
    save_checkpoint({"model": gpt.state_dict(), "config": asdict(gpt_config)}, run / "gpt" / "checkpoints" / "best.pt")
    return run


@pytest.fixture(scope="module")
def generator(run_dir):
    return JetGenerator(run_dir)  # loaded once: the runs time generation, not loading the run


# generate's default block of jets (its --batch-size), read from generate_file so the two cannot drift
DEFAULT_BLOCK = inspect.signature(generate_file).parameters["batch_size"].default
# (batch, jets): the CaloChallenge's batch sizes 1, 100 and 10,000, and generate's default blocks
# (the default sizes' figure, N_JETS jets).
CASES = [(1, 20), (100, 1_000), (DEFAULT_BLOCK, N_JETS), (10_000, N_JETS)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("batch, jets", CASES, ids=[f"batch{batch}" for batch, _ in CASES])
def test_generate_ms_per_jet(benchmark, record, run_dir, generator, tmp_path, batch, jets, precision):
    """The whole path of ``jetfast generate`` (sample, dequantize, decode, draw, write LZF HDF5) with
    blocks of ``batch`` jets; the small batches after one warm-up round."""
    times = StageTimes()
    outputs = iter(range(100))

    def generate():
        return generate_file(run_dir, jets, tmp_path / f"gen{next(outputs)}.h5", batch_size=batch, seed=0,
                             precision=precision, progress=False, times=times, generator=generator)

    benchmark.pedantic(generate, rounds=1 if jets >= N_JETS else 3, warmup_rounds=0 if jets >= N_JETS else 1)
    seconds = benchmark.stats.stats.min
    shares = times.shares()
    record(batch=batch, ms_per_jet=1e3 * seconds / jets, jets_per_s=jets / seconds, load_average=os.getloadavg()[0],
           **{f"{stage}_share": round(share, 3) for stage, share in shares.items()})
