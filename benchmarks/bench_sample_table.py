"""Sampler timing table, CaloChallenge style: ms per jet at batch 1, 100, 512 and 10,000 for
jetfast in fp32 and bf16 and for the plain PyTorch KV-cache loop (bench_sample.py), on the
default model (d_model 256, 4 layers, 8 heads, 128 codes of 256 bins), CPU, default threads.

Floors, per jet, from DESIGN.md's machine (~20 GB/s memory, ~140 GFLOP/s fp32 matmul):

- compute: 855.9 MFLOP per jet (bench_sample.py), 6.1 ms at 140 GFLOP/s, at any batch;
- memory: every step reads the blocks' weights once for the whole batch (12.6 MB in fp32,
  6.3 MB in bf16) and every sequence's cached prefix in every layer (8 * 256 * t bytes in
  fp32 at position t: 67.6 MB per jet over the 127 steps; half in bf16). At batch 1 the
  weights dominate: 127 * 12.6 MB = 1.6 GB per jet, ~80 ms at 20 GB/s (bf16's 6.3 MB fit an
  8 MB L3 and could be read faster than that);
- the floor is the larger of the two, recorded beside each rate (``floor_ms_per_jet``,
  ``over_floor``).

Batch 10,000 (a 10.5 GB fp32 cache) is timed on 16 of the 127 decode steps (t = 8k+4 for
even k, 8k+5 for odd k) and scaled by 8, as bench_sample.py times its slow baseline: exact for
a step cost linear in t. The machine's load average is recorded with every entry: on a shared
machine compare the ratios within one run.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from benchmarks.bench_sample import (
    CONFIG,
    FLOP_PER_SEQUENCE,
    STEP_STRIDE,
    plain_kv_cache_sample,
    plain_kv_cache_step,
    plain_kv_caches,
    timed_steps,
)
from jetfast.generation.sampler import PRECISIONS, _make_picker, sample
from jetfast.models.gpt import GPT, decode_one_token, prefill
from jetfast.seeding import jet_uniforms

BATCHES = (1, 100, 512, 10_000)
STEP_SAMPLED_FROM = 10_000  # batches this large are timed on every STEP_STRIDE-th step
JETS_AT_BATCH_1 = 4
MEMORY_BYTES_PER_S = 20e9
MATMUL_FLOP_PER_S = 140e9
_MS_PER_JET: dict[tuple[str, int], float] = {}


def weight_bytes(element_bytes: int) -> int:
    return CONFIG.n_layers * 12 * CONFIG.d_model**2 * element_bytes


def floor_ms_per_jet(batch: int, element_bytes: int) -> float:
    steps = CONFIG.seq_len - 1
    kv_bytes = sum(CONFIG.n_layers * 2 * CONFIG.d_model * t * element_bytes for t in range(1, CONFIG.seq_len + 1))
    memory = (steps * weight_bytes(element_bytes) / batch + kv_bytes) / MEMORY_BYTES_PER_S
    return 1e3 * max(memory, FLOP_PER_SEQUENCE / MATMUL_FLOP_PER_S)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


@torch.inference_mode()
def jetfast_sampled_steps(model: GPT, batch: int, precision: str) -> float:
    """Seconds for jetfast's sampler on ``batch`` jets from every STEP_STRIDE-th decode step."""
    config = model.config
    model.setup_caches(batch, dtype=PRECISIONS[precision])
    try:
        for block in model.blocks:  # as if the earlier steps had run
            block.attn.kv_cache.k_cache.fill_(0.5)
            block.attn.kv_cache.v_cache.fill_(0.5)
        pick = _make_picker(1.0, None, None, False, jet_uniforms(0, 0, batch, config.seq_len))
        start = time.perf_counter()
        logits = prefill(model, model.class_tokens(torch.ones(batch, dtype=torch.long)))
        seconds = time.perf_counter() - start
        codes = torch.randint(0, config.vocab_size, (batch,))
        for pos in timed_steps(config.seq_len):
            start = time.perf_counter()
            logits = decode_one_token(model, codes, pos)
            pick(logits, pos)
            seconds += (time.perf_counter() - start) * STEP_STRIDE
        return seconds
    finally:
        model.clear_caches()


@torch.inference_mode()
def plain_sampled_steps(model: GPT, batch: int) -> float:
    caches = plain_kv_caches(model, batch)
    for k_cache, v_cache in caches:
        k_cache.fill_(0.5)
        v_cache.fill_(0.5)
    token = torch.full((batch,), model.config.vocab_size + 1, dtype=torch.long)
    start = time.perf_counter()
    token = plain_kv_cache_step(model, caches, token, 0)
    seconds = time.perf_counter() - start
    for pos in timed_steps(model.config.seq_len):
        start = time.perf_counter()
        plain_kv_cache_step(model, caches, token, pos)
        seconds += (time.perf_counter() - start) * STEP_STRIDE
    return seconds


def _run(benchmark, record, name, batch, element_bytes, full_run, sampled_steps):
    if batch >= STEP_SAMPLED_FROM:
        seconds = benchmark.pedantic(sampled_steps, rounds=1, iterations=1)
        jets = batch
    else:
        jets = JETS_AT_BATCH_1 if batch == 1 else batch
        full_run(min(jets, 8))  # warm-up
        benchmark.pedantic(full_run, args=(jets,), rounds=3, iterations=1)
        seconds = benchmark.stats.stats.min
    ms = 1e3 * seconds / jets
    _MS_PER_JET[(name, batch)] = ms
    floor = floor_ms_per_jet(batch, element_bytes)
    figures = dict(batch=batch, ms_per_jet=ms, floor_ms_per_jet=floor, over_floor=ms / floor,
                   load_average=os.getloadavg()[0], threads=torch.get_num_threads())
    if name != "plain" and ("plain", batch) in _MS_PER_JET:
        figures["speedup_vs_plain"] = _MS_PER_JET[("plain", batch)] / ms
    if name == "jetfast_bf16" and ("jetfast_fp32", batch) in _MS_PER_JET:
        figures["bf16_over_fp32_time"] = ms / _MS_PER_JET[("jetfast_fp32", batch)]
    record(**figures)


# Per batch size: the plain loop first, then jetfast fp32, then bf16 (pytest keeps this order).
@pytest.mark.parametrize("name", ["plain", "jetfast_fp32", "jetfast_bf16"])
@pytest.mark.parametrize("batch", BATCHES)
def test_sampler_ms_per_jet(benchmark, record, model, name, batch):
    if name == "plain":
        _run(benchmark, record, name, batch, 4,
             lambda jets: plain_kv_cache_sample(model, jets) if batch > 1 else [plain_kv_cache_sample(model, 1)
                                                                                 for _ in range(jets)],
             lambda: plain_sampled_steps(model, batch))
        return
    precision = name.split("_")[1]

    def full_run(jets):
        return sample(model, jets, cls="quark", seed=0, batch_size=batch, precision=precision)

    _run(benchmark, record, name, batch, 2 if precision == "bf16" else 4, full_run,
         lambda: jetfast_sampled_steps(model, batch, precision))
