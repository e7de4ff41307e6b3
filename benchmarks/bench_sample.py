"""Code sampling throughput on the CPU: 128 codes per jet, d_model 256, 4 layers, 8 heads,
256 bins, batch 512, fp32.

Floor: one sequence costs, per generated position t = 1..128, 24 d^2 = 1.57 MFLOP of
projections and MLP per layer (x 4 layers), 4 d t FLOP of attention per layer and
2 d V = 0.13 MFLOP for the output head: 855.9 MFLOP per sequence in all, 822 of them in
GEMMs. At DESIGN.md's fp32 matmul rate (~140 GFLOP/s) that is a ceiling of ~164
sequences/s; oneDNN reaches ~205 GFLOP/s on the decode shapes here (2.1 s per batch).
Decode attention adds memory traffic the FLOPs do not show: every step streams every
layer's cached prefix, 34.6 GB per batch of 512, ~1.1 s at the ~32 GB/s two cores read.

Baselines, same weights, same run:
- plain KV cache: the usual PyTorch loop with a static cache, one token per step and
  ``scaled_dot_product_attention`` over the whole cache under a position mask (gpt-fast's
  eager path);
- seed approach: no cache, the whole model re-run on the full prefix at every step.
  Its cost per sequence depends on the batch (measured here: ~20k tokens/s at batch
  32, ~15k at batch 512, where the activations no longer fit in cache), so it is
  timed twice: a full run of 32 sequences, and at the benchmark's batch of 512 on 16
  of the 128 steps (t = 8k+4 for even k, 8k+5 for odd k, scaled by 8: exact for a
  step cost linear in t, and checked against the full run at batch 32).
Sequences/s are in ``extra_info`` (and the summary table); the jetfast entry also
records its speed-up over each baseline.
"""

import time

import pytest
import torch
import torch.nn.functional as F

from jetfast.models.gpt import GPT, GPTConfig
from jetfast.generation.sampler import sample

CONFIG = GPTConfig(vocab_size=256, seq_len=128, d_model=256, n_heads=8, n_layers=4, dropout=0.0)
BATCH = 512
SEED_APPROACH_BATCH = 32
STEP_STRIDE = 8
FLOP_PER_SEQUENCE = sum(
    CONFIG.n_layers * (24 * CONFIG.d_model**2 + 4 * CONFIG.d_model * t) + 2 * CONFIG.d_model * CONFIG.vocab_size
    for t in range(1, CONFIG.seq_len + 1)
)
_RATES: dict[str, float] = {}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


def _record_rate(record, name, seconds, sequences):
    rate = sequences / seconds
    _RATES[name] = rate
    record(sequences_per_s=rate, GFLOP_per_s=rate * FLOP_PER_SEQUENCE / 1e9, threads=torch.get_num_threads())
    return rate


def plain_kv_caches(model: GPT, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    config = model.config
    shape = (n, config.n_heads, config.seq_len, config.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in model.blocks]


@torch.inference_mode()
def plain_kv_cache_step(model: GPT, caches, token: torch.Tensor, pos: int) -> torch.Tensor:
    """One step of the plain loop: token (B,) at ``pos``, SDPA over the whole cache under a
    position mask; the next tokens (B,) drawn with torch.multinomial."""
    config = model.config
    n, heads, head_dim = len(token), config.n_heads, config.head_dim
    mask = (torch.arange(config.seq_len) <= pos)[None]  # (1, S)
    x = model.tok_emb(token)[:, None] + model.pos_emb[pos]  # (B, 1, C)
    for block, (k_cache, v_cache) in zip(model.blocks, caches):
        attn = block.attn
        q, k, v = attn.qkv(block.ln_1(x)).view(n, 1, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        k_cache[:, :, pos : pos + 1] = k
        v_cache[:, :, pos : pos + 1] = v
        y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
        x = x + attn.proj(y.transpose(1, 2).reshape(n, 1, config.d_model))
        x = x + block.mlp(block.ln_2(x))
    logits = model.head(model.ln_f(x))[:, -1]
    return torch.multinomial(torch.softmax(logits, -1), 1)[:, 0]


@torch.inference_mode()
def plain_kv_cache_sample(model: GPT, n: int, label: int = 1) -> torch.Tensor:
    """Multinomial sampling with a static cache and SDPA over the whole cache (masked)."""
    config = model.config
    caches = plain_kv_caches(model, n)
    token = torch.full((n,), config.vocab_size + label, dtype=torch.long)
    codes = torch.empty(n, config.seq_len, dtype=torch.long)
    for pos in range(config.seq_len):
        token = plain_kv_cache_step(model, caches, token, pos)
        codes[:, pos] = token
    return codes


@torch.inference_mode()
def seed_approach_sample(model: GPT, n: int, label: int = 1) -> torch.Tensor:
    """No cache: the full prefix through the whole model at every step."""
    seq = torch.full((n, 1), model.config.vocab_size + label, dtype=torch.long)
    for _ in range(model.config.seq_len):
        logits = model(seq)[:, -1]
        seq = torch.cat([seq, torch.multinomial(torch.softmax(logits, -1), 1)], 1)
    return seq[:, 1:]


def timed_steps(seq_len: int, stride: int = STEP_STRIDE) -> list[int]:
    """One step per group of `stride`, its prefix lengths averaging the group's mean."""
    return [k * stride + stride // 2 + (k % 2) for k in range(seq_len // stride)]


@torch.inference_mode()
def seed_approach_sampled_steps(model: GPT, n: int, label: int = 1) -> float:
    """Seconds for the seed approach on n sequences, from every `STEP_STRIDE`-th step."""
    config = model.config
    seq = torch.randint(0, config.vocab_size, (n, config.seq_len))
    seq[:, 0] = config.vocab_size + label
    seconds = 0.0
    for length in timed_steps(config.seq_len):
        start = time.perf_counter()
        logits = model(seq[:, :length])[:, -1]
        torch.cat([seq[:, :length], torch.multinomial(torch.softmax(logits, -1), 1)], 1)
        seconds += time.perf_counter() - start
    return seconds * STEP_STRIDE


def test_seed_approach_no_cache(benchmark, record, model):
    seed_approach_sample(model, 2)  # warm-up
    benchmark.pedantic(seed_approach_sample, args=(model, SEED_APPROACH_BATCH), rounds=1, iterations=1)
    _record_rate(record, "seed", benchmark.stats.stats.min, SEED_APPROACH_BATCH)
    # The step-sampling estimate at the same batch, to show it can stand in for a full run.
    estimate = seed_approach_sampled_steps(model, SEED_APPROACH_BATCH)
    record(sampled_steps_estimate_over_full_run=estimate / benchmark.stats.stats.min)


def test_seed_approach_no_cache_batch_512(benchmark, record, model):
    seconds = benchmark.pedantic(seed_approach_sampled_steps, args=(model, BATCH), rounds=1, iterations=1)
    _record_rate(record, "seed_512", seconds, BATCH)


def test_plain_kv_cache_loop(benchmark, record, model):
    plain_kv_cache_sample(model, 8)
    benchmark.pedantic(plain_kv_cache_sample, args=(model, BATCH), rounds=3, iterations=1)
    _record_rate(record, "plain", benchmark.stats.stats.min, BATCH)


def test_jetfast_sample(benchmark, record, model):
    sample(model, 8, cls="quark", seed=0)
    benchmark.pedantic(lambda: sample(model, BATCH, cls="quark", seed=0, batch_size=BATCH), rounds=3, iterations=1)
    rate = _record_rate(record, "jetfast", benchmark.stats.stats.min, BATCH)
    figures = {"fraction_of_140_GFLOP_ceiling": rate * FLOP_PER_SEQUENCE / 140e9}
    for name in ("plain", "seed", "seed_512"):
        if name in _RATES:
            figures[f"speedup_vs_{name}"] = rate / _RATES[name]
    record(**figures)


def test_jetfast_sample_conditioned_on_pt_and_mass(benchmark, record):
    """The same model conditioned on per-jet pT and mass too: the condition enters at the prefill,
    so the rate should be the class-only one's (the ratio is recorded)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**vars(CONFIG), "kinematic": True})).eval()
    model.set_kinematics(torch.tensor([70.0, 200.0]), torch.tensor([1.0, 60.0]))
    generator = torch.Generator().manual_seed(0)
    pt, mass = 70 + 130 * torch.rand(BATCH, generator=generator), 1 + 59 * torch.rand(BATCH, generator=generator)
    sample(model, 8, cls="quark", pt=pt[:8], mass=mass[:8], seed=0)
    benchmark.pedantic(lambda: sample(model, BATCH, cls="quark", pt=pt, mass=mass, seed=0, batch_size=BATCH), rounds=3,
                       iterations=1)
    rate = _record_rate(record, "jetfast_conditioned", benchmark.stats.stats.min, BATCH)
    if "jetfast" in _RATES:
        record(rate_over_class_only=rate / _RATES["jetfast"])


if __name__ == "__main__":
    # Quick look without pytest-benchmark: python benchmarks/bench_sample.py [batch]
    import sys

    batch = int(sys.argv[1]) if len(sys.argv) > 1 else BATCH
    torch.manual_seed(0)
    net = GPT(CONFIG).eval()
    print(f"{FLOP_PER_SEQUENCE / 1e6:.1f} MFLOP per sequence; ceiling at 140 GFLOP/s: "
          f"{140e9 / FLOP_PER_SEQUENCE:.0f} sequences/s; threads {torch.get_num_threads()}")
    for name, fn in (("jetfast", lambda: sample(net, batch, cls="quark", seed=0, batch_size=batch)),
                     ("plain KV cache", lambda: plain_kv_cache_sample(net, batch))):
        fn()
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        print(f"{name:>15}: {batch / seconds:7.1f} sequences/s ({seconds:.2f} s for {batch})")
