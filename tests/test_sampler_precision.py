"""The sampler in bf16: logits against fp32 and fp64 at every step, judged relative to PyTorch's own
bf16 error, and the codes it draws against fp32's, dimension by dimension."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from jetfast.errors import InvalidArgument
from jetfast.generation.sampler import sample
from jetfast.models.gpt import GPT, GPTConfig, decode_one_token, prefill


def peaked_model(seed: int, sharpness: float = 1.0, **overrides) -> GPT:
    """A small model whose next-code distributions are peaked and depend on the prefix: weights
    scaled up from the initialisation's 0.02, the output head by ``sharpness`` more."""
    torch.manual_seed(seed)
    config = dict(vocab_size=16, seq_len=12, d_model=64, n_heads=4, n_layers=2, dropout=0.0)
    config.update(overrides)
    model = GPT(GPTConfig(**config)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.mul_(8.0 * (sharpness if name == "head.weight" else 1.0))
    return model


def cached_logits(model: GPT, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T, vocab) logits of the cached decode fed ``tokens`` (B, T) (start token first)."""
    with torch.inference_mode():
        model.setup_caches(len(tokens), dtype=dtype)
        steps = [prefill(model, tokens[:, 0])]
        steps += [decode_one_token(model, tokens[:, pos], pos) for pos in range(1, tokens.shape[1])]
        cache = model.blocks[0].attn.kv_cache.k_cache
        model.clear_caches()
    assert all(step.dtype == torch.float32 for step in steps) and cache.dtype == dtype
    return torch.stack(steps, 1)


@pytest.mark.parametrize("code_values", [False, True])
def test_bf16_logits_at_every_step_within_pytorchs_own_bf16_error(code_values, seed):
    model = peaked_model(seed, code_values=code_values)
    if code_values:
        centers = torch.sort(torch.randn(12, 16, dtype=torch.float64), dim=1).values
        model.set_code_values(centers, centers.mean(1), centers.std(1))
    generator = torch.Generator().manual_seed(seed)
    batch, length = 24, model.config.seq_len
    tokens = torch.randint(0, 16, (batch, length), generator=generator)
    tokens[:, 0] = model.class_tokens(torch.randint(-1, 2, (batch,), generator=generator))
    with torch.inference_mode():
        reference = copy.deepcopy(model).double()(tokens)  # fp64, full forward
        pytorch_bf16 = copy.deepcopy(model).bfloat16()(tokens).double()  # the whole model in bf16
    fp32 = cached_logits(model, tokens, torch.float32).double()
    bf16 = cached_logits(model, tokens, torch.bfloat16).double()
    scale = reference.abs().amax(dim=(0, 2))  # per step
    assert scale.min() > 1.0, "the logits should be peaked for this test to mean anything"
    ours = (bf16 - reference).abs().amax(dim=(0, 2))
    theirs = (pytorch_bf16 - reference).abs().amax(dim=(0, 2))
    print("bf16 error per step:", ours.tolist(), "PyTorch bf16:", theirs.tolist())
    # flash-attention's rule, step by step: at most twice PyTorch's own bf16 error, plus a few
    # bf16 roundings of the step's logits (a step where PyTorch happens to err little).
    assert (ours <= 2 * theirs + 4 * 2.0**-8 * scale).all()
    # And bf16 is bf16: further from fp64 than fp32 is, which is near fp32 rounding.
    assert ((fp32 - reference).abs().amax(dim=(0, 2)) <= 1e-4 * scale).all()
    assert (ours > 10 * (fp32 - reference).abs().amax(dim=(0, 2))).any()


def code_histograms_differ(model: GPT, n: int, perturb=None) -> float:
    """The smallest p-value, over the dimensions, of a chi-square test that codes drawn in fp32 and
    in bf16 (other seeds) have one distribution; ``perturb(logits)`` shifts the bf16 run's logits."""
    fp32 = sample(model, n, cls="quark", seed=1, batch_size=n).numpy()
    if perturb is not None:
        decode_step = model.decode_step
        model.decode_step = lambda *args, **kwargs: perturb(decode_step(*args, **kwargs))
    try:
        bf16 = sample(model, n, cls="quark", seed=2, batch_size=n, precision="bf16").numpy()
    finally:
        model.__dict__.pop("decode_step", None)
    p_values = []
    for dim in range(fp32.shape[1]):
        counts = np.stack([np.bincount(fp32[:, dim], minlength=16), np.bincount(bf16[:, dim], minlength=16)])
        counts = counts[:, counts.sum(0) > 0]
        p_values.append(1.0 if counts.shape[1] < 2 else chi2_contingency(counts).pvalue)
    return min(p_values)


def test_bf16_codes_have_fp32_histograms_and_a_shift_is_seen(seed):
    model = peaked_model(seed, sharpness=0.5)
    n, dims = 4000, model.config.seq_len
    threshold = 1e-3 / dims  # Bonferroni: a false alarm in one run of a thousand
    assert code_histograms_differ(model, n) > threshold
    # A real shift must be seen: 0.3 nat more for the lower half of the codes (p ~ 1e-9 or below
    # where the threshold is ~1e-4).
    lower_half = torch.arange(16) < 8
    assert code_histograms_differ(model, n, perturb=lambda logits: logits + 0.3 * lower_half) < threshold


def test_bf16_sampling_is_reproducible_per_jet(seed):
    model = peaked_model(seed)
    first = sample(model, 9, cls="gluon", seed=seed, batch_size=9, precision="bf16")
    assert torch.equal(first, sample(model, 9, cls="gluon", seed=seed, batch_size=9, precision="bf16"))
    again = sample(model, 9, cls="gluon", seed=seed, batch_size=4, precision="bf16")
    # Another batch size may change a GEMM's last bits, which can flip a draw on a CDF boundary.
    assert (again == first).all(1).float().mean() >= 0.75


def test_unknown_precision_is_refused():
    model = peaked_model(0)
    for precision in ("fp16", "BF16", None, torch.bfloat16):
        with pytest.raises(InvalidArgument, match="precision must be one of 'fp32', 'bf16'"):
            sample(model, 2, precision=precision)
