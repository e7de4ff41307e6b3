"""decode_attention: the CPU path and the Triton kernel against an fp64 reference.

The Triton kernel runs in Triton's interpreter on CPU tensors, called directly (the op
itself always takes the CPU path for CPU tensors). The interpreter must be switched on
before triton is first imported, so those checks run in one child process
(``TRITON_INTERPRET=1``) whose results the tests below read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jetfast._ext import HAS_NATIVE, _C
from jetfast.kernels.decode_attention import decode_attention
from tests.references import (
    assert_attention_close,
    attention_errors,
    attention_inputs,
    attention_reference,
    position_major,
)

REPO = Path(__file__).resolve().parents[1]
LOW_PRECISION = (torch.float16, torch.bfloat16)
needs_bf16_kernel = pytest.mark.skipif(not (HAS_NATIVE and _C.decode_attention_bf16), reason="needs the compiled AVX2 kernels")


# ---------------------------------------------------------------------------------------------
# CPU path
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 24])
@pytest.mark.parametrize("length", [1, 7, 50, 128])
def test_cpu_path_matches_fp64_reference(dtype, head_dim, length, seed):
    q, k_cache, v_cache = attention_inputs(3, 5, 131, head_dim, length, dtype, seed)
    out = decode_attention(q, k_cache, v_cache, length)
    assert out.shape == (3, 5, head_dim) and out.dtype == dtype
    assert torch.isfinite(out).all(), f"seed {seed}: the poisoned cache tail was read"
    assert_attention_close(*attention_errors(out, q, k_cache, v_cache, length), dtype)


@pytest.mark.parametrize("tail", [float("nan"), float("inf"), float("-inf"), 1e30, -3e38])
@pytest.mark.parametrize("length", [33, 100, 130])
def test_cpu_path_ignores_anything_past_length(tail, length):
    """The CPU path may stream the whole cache; whatever sits past `length` must not matter."""
    q, k_cache, v_cache = attention_inputs(2, 3, 131, 32, length, torch.float32, seed=length, poison=False)
    expected = attention_reference(q, k_cache, v_cache, length)
    k_cache[:, :, length:] = tail
    v_cache[:, :, length:] = -tail
    out = decode_attention(q, k_cache, v_cache, length)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)


def test_cpu_path_accepts_4d_and_strided_query():
    q, k_cache, v_cache = attention_inputs(2, 4, 20, 32, 13, torch.float32, seed=1)
    # A query that is a view into a fused qkv projection, as in the model.
    qkv = torch.randn(2, 3, 4, 32)
    qkv[:, 0] = q
    expected = attention_reference(q, k_cache, v_cache, 13)
    torch.testing.assert_close(decode_attention(qkv[:, 0], k_cache, v_cache, 13).double(), expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(decode_attention(q[:, :, None], k_cache, v_cache, 13).double(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("layout", ["contiguous", "position_major"])
@pytest.mark.parametrize(
    "batch, heads, max_len, head_dim, length",
    [(3, 5, 131, 16, 1), (7, 10, 40, 32, 39), (1, 1, 300, 48, 257), (2, 3, 64, 256, 64), (5, 3, 33, 96, 17),
     (4, 2, 19, 20, 19), (3, 1, 9, 7, 5), (100, 6, 24, 16, 22), (60, 5, 1001, 16, 999)],
)
def test_compiled_cpu_kernel_matches_fp64_reference(layout, batch, heads, max_len, head_dim, length, seed):
    """Both cache layouts, vector (Dh = 16k) and scalar head sizes, more rows than a block."""
    q, k_cache, v_cache = attention_inputs(batch, heads, max_len, head_dim, length, torch.float32, seed)
    expected = attention_reference(q, k_cache, v_cache, length)
    if layout == "position_major":
        k_cache, v_cache = position_major(k_cache), position_major(v_cache)
    out = decode_attention(q, k_cache, v_cache, length)
    assert torch.isfinite(out).all(), f"seed {seed}: the poisoned cache tail was read"
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6 * max(1.0, expected.abs().max().item()))


@needs_bf16_kernel
@pytest.mark.parametrize("layout", ["contiguous", "position_major"])
@pytest.mark.parametrize(
    "batch, heads, max_len, head_dim, length",
    [(3, 5, 131, 16, 1), (7, 10, 40, 32, 39), (1, 1, 300, 48, 257), (2, 3, 64, 256, 64), (5, 3, 33, 96, 17),
     (100, 6, 24, 8, 22), (60, 5, 1001, 24, 999)],
)
def test_compiled_cpu_kernel_reads_bf16_caches(monkeypatch, layout, batch, heads, max_len, head_dim, length, seed):
    """bf16 caches are read by the kernel in fp32 arithmetic (not copied to fp32 first, which cost
    5x the fp32 step at batch 512): the output is the fp64 attention of the same bf16 numbers,
    rounded once to bf16."""
    import jetfast.kernels.decode_attention as module

    q, k_cache, v_cache = attention_inputs(batch, heads, max_len, head_dim, length, torch.bfloat16, seed)
    expected = attention_reference(q, k_cache, v_cache, length)
    if layout == "position_major":
        k_cache, v_cache = position_major(k_cache), position_major(v_cache)
    monkeypatch.setattr(module, "_attend", None)  # the copying fallback must not run
    out = decode_attention(q, k_cache, v_cache, length)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all(), f"seed {seed}: the poisoned cache tail was read"
    bound = torch.finfo(torch.bfloat16).eps * expected.abs() + 1e-5 * max(1.0, expected.abs().max().item())
    assert ((out.double() - expected).abs() <= bound).all(), f"seed {seed}"


@pytest.mark.parametrize("layout", ["contiguous", "position_major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "batch, heads, max_len, head_dim, length",
    [(3, 5, 131, 16, 1), (7, 10, 40, 32, 39), (2, 3, 64, 256, 64), (4, 2, 19, 24, 19), (100, 6, 24, 16, 22)],
)
def test_appending_attention_writes_the_step_then_attends(layout, dtype, batch, heads, max_len, head_dim, length, seed):
    """decode_attention_cpu with k_new and v_new: the caches hold them at length - 1 afterwards (and
    nothing else changed), and the output is the reference attention over the updated caches. The
    new keys come strided out of a step's (B, 3, H, Dh) qkv, as in the model."""
    from jetfast.kernels.decode_attention import decode_attention_cpu

    q, k_cache, v_cache = attention_inputs(batch, heads, max_len, head_dim, length, dtype, seed)
    qkv = torch.randn(batch, 3, heads, head_dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected_k[:, :, length - 1], expected_v[:, :, length - 1] = qkv[:, 1], qkv[:, 2]
    expected = attention_reference(qkv[:, 0], expected_k, expected_v, length)
    if layout == "position_major":
        k_cache, v_cache = position_major(k_cache), position_major(v_cache)
    out = decode_attention_cpu(qkv[:, 0], k_cache, v_cache, length, qkv[:, 1], qkv[:, 2])
    torch.testing.assert_close(k_cache, expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, expected_v, rtol=0, atol=0, equal_nan=True)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6 * max(1.0, expected.abs().max().item()))
    else:
        bound = torch.finfo(torch.bfloat16).eps * expected.abs() + 1e-5 * max(1.0, expected.abs().max().item())
        assert ((out.double() - expected).abs() <= bound).all(), f"seed {seed}"


@pytest.mark.skipif(not HAS_NATIVE, reason="needs the compiled extension")
def test_compiled_appending_kernel_refuses_bad_new_keys():
    q, cache, out = torch.randn(2, 3, 16), torch.zeros(2, 3, 9, 16), torch.empty(2, 3, 16)
    args = (q.numpy(), cache.numpy(), cache.clone().numpy(), 4, out.numpy(), 1)
    with pytest.raises(ValueError, match="both k_new and v_new"):
        _C.decode_attention_cpu(*args, q.numpy())
    with pytest.raises(ValueError, match=r"k_new and v_new must be \(B, H, Dh\)"):
        _C.decode_attention_cpu(*args, q[:1].numpy(), q[:1].numpy())
    with pytest.raises(TypeError, match="k_new"):
        _C.decode_attention_cpu(*args, q.double().numpy(), q.numpy())
    with pytest.raises(ValueError, match="writable"):
        frozen = cache.numpy().copy()
        frozen.flags.writeable = False
        _C.decode_attention_cpu(q.numpy(), frozen, frozen, 4, out.numpy(), 1, q.numpy(), q.numpy())


@needs_bf16_kernel
def test_compiled_cpu_kernel_refuses_what_it_cannot_read():
    q = torch.randn(2, 3, 20)
    out = torch.empty(2, 3, 20)
    bits = torch.zeros(2, 3, 9, 20, dtype=torch.bfloat16).view(torch.int16).numpy()
    with pytest.raises(ValueError, match="head size"):
        _C.decode_attention_cpu(q.numpy(), bits, bits, 4, out.numpy(), 1)
    with pytest.raises(TypeError, match="v_cache must be bfloat16"):
        _C.decode_attention_cpu(q.numpy(), bits, torch.zeros(2, 3, 9, 20).numpy(), 4, out.numpy(), 1)
    with pytest.raises(TypeError, match="bfloat16 bits"):
        _C.decode_attention_cpu(q.numpy(), bits.view("float16"), bits.view("float16"), 4, out.numpy(), 1)


def test_compiled_cpu_kernel_on_peaked_and_flat_scores():
    """Scores spanning ~200 nats (weights underflow to 0) and all-equal scores."""
    q, k_cache, v_cache = attention_inputs(4, 3, 70, 32, 70, torch.float32, seed=5, poison=False)
    for scale in (40.0, 0.0):
        out = decode_attention(q * scale, position_major(k_cache), position_major(v_cache), 70)
        # Scores of ~200 nats carry an fp32 rounding of ~200 * 6e-8 into every weight: judged
        # against PyTorch's own fp32 error on the same inputs, not a fixed constant.
        error, own, size = attention_errors(out, q * scale, k_cache, v_cache, 70)
        assert error <= 4 * own + 2e-6 * max(1.0, size), (scale, error, own)


def test_nan_inside_the_prefix_reaches_only_its_row():
    q, k_cache, v_cache = attention_inputs(3, 2, 16, 32, 16, torch.float32, seed=6, poison=False)
    q[0, 1, 3] = float("nan")  # row (0, 1): NaN scores
    v_cache[2, 0, 5, 0] = float("nan")  # row (2, 0): a NaN value
    out = decode_attention(q, position_major(k_cache), position_major(v_cache), 16)
    assert torch.isnan(out[0, 1]).all() and torch.isnan(out[2, 0, 0])
    assert torch.isfinite(out[0, 0]).all() and torch.isfinite(out[1]).all() and torch.isfinite(out[2, 1]).all()


def test_length_one_returns_the_single_value():
    q, k_cache, v_cache = attention_inputs(2, 3, 9, 16, 1, torch.float32, seed=2)
    torch.testing.assert_close(decode_attention(q, k_cache, v_cache, 1), v_cache[:, :, 0], rtol=0, atol=0)


def test_empty_batch():
    q, k_cache, v_cache = attention_inputs(0, 2, 8, 32, 4, torch.float32, seed=3)
    assert decode_attention(q, k_cache, v_cache, 4).shape == (0, 2, 32)


def test_opcheck_cpu():
    q, k_cache, v_cache = attention_inputs(2, 3, 17, 32, 11, torch.float32, seed=4, poison=False)
    torch.library.opcheck(torch.ops.jetfast.decode_attention.default, (q, k_cache, v_cache, 11))


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda q, k, v: (q[:, :2], k, v, 4), ValueError, "does not match the cache"),
        (lambda q, k, v: (q, k, v[:, :, :5], 4), ValueError, "must have one shape"),
        (lambda q, k, v: (q[..., :16], k, v, 4), ValueError, "does not match"),
        (lambda q, k, v: (q[:, :, None].expand(-1, -1, 2, -1), k, v, 4), ValueError, "one query per head"),
        (lambda q, k, v: (q, k[0], v[0], 4), ValueError, "expected q"),
        (lambda q, k, v: (q, k, v, 0), ValueError, "1 <= length <= S_max=8"),
        (lambda q, k, v: (q, k, v, 9), ValueError, "got length=9"),
        (lambda q, k, v: (q, k, v, 4.0), TypeError, "Python int"),
        (lambda q, k, v: (q, k, v, torch.tensor(4)), TypeError, "Python int"),
        (lambda q, k, v: (q.double(), k.double(), v.double(), 4), TypeError, "float32, float16, bfloat16"),
        (lambda q, k, v: (q, k.half(), v, 4), TypeError, "share one dtype"),
        (lambda q, k, v: (q, k.to("meta"), v, 4), ValueError, "different devices"),
        (lambda q, k, v: (q.numpy(), k, v, 4), TypeError, "torch tensors"),
    ],
)
def test_bad_input_is_a_clear_error(change, error, match):
    q, k_cache, v_cache = attention_inputs(2, 3, 8, 32, 4, torch.float32, seed=5, poison=False)
    with pytest.raises(error, match=match):
        decode_attention(*change(q, k_cache, v_cache))


def test_head_size_zero_is_a_clear_error():
    with pytest.raises(ValueError, match="head size Dh must be >= 1"):
        decode_attention(torch.empty(2, 3, 0), torch.empty(2, 3, 8, 0), torch.empty(2, 3, 8, 0), 4)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_inputs_that_require_grad_are_refused_up_front(which):
    inputs = list(attention_inputs(2, 3, 8, 32, 4, torch.float32, seed=6, poison=False))
    inputs[which].requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference only"):
        decode_attention(*inputs, 4)
    with torch.no_grad():
        assert decode_attention(*inputs, 4).shape == (2, 3, 32)


# ---------------------------------------------------------------------------------------------
# The Triton kernel, in Triton's interpreter (one child process for all cases)
# ---------------------------------------------------------------------------------------------
# (name, batch, heads, max_len, head_dim, length, dtype, num_splits or None for the kernel's own choice)
INTERPRETER_CASES = [
    (f"{dtype}-Dh{head_dim}-L{length}", 2, 3, 131, head_dim, length, dtype, None)
    for dtype in ("float32", "float16", "bfloat16")
    for head_dim in (32, 64)
    for length in (1, 7, 128)
] + [
    # split-K over a long cache, with an odd number of splits and a ragged last block
    ("split3-float32-Dh64-L300", 1, 2, 317, 64, 300, "float32", 3),
    ("split5-bfloat16-Dh32-L257", 1, 1, 257, 32, 257, "bfloat16", 5),
    ("auto-split-float32-Dh128-L600", 1, 2, 640, 128, 600, "float32", None),
    # the model's cache layout, positions outermost
    ("position-major-float32-Dh32-L77", 3, 4, 90, 32, 77, "float32", None),
    ("position-major-split2-bfloat16-Dh64-L130", 1, 2, 140, 64, 130, "bfloat16", 2),
]


def _interpreter_main() -> None:
    """Child process: run every case through the interpreted kernel, print JSON results."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from jetfast.kernels.decode_attention import _decode_attention_triton

    results = {}
    seed = int(sys.argv[-1])
    for number, (name, batch, heads, max_len, head_dim, length, dtype, splits) in enumerate(INTERPRETER_CASES):
        dtype = getattr(torch, dtype)
        q, k_cache, v_cache = attention_inputs(batch, heads, max_len, head_dim, length, dtype, seed + number)
        if name.startswith("position-major"):
            k_cache, v_cache = position_major(k_cache), position_major(v_cache)
        out = _decode_attention_triton(q, k_cache, v_cache, length, num_splits=splits)
        kernel_error, torch_error, ref_max = attention_errors(out, q, k_cache, v_cache, length)
        results[name] = {
            "finite": bool(torch.isfinite(out).all()),
            "dtype_ok": out.dtype == dtype and tuple(out.shape) == (batch, heads, head_dim),
            "kernel_error": kernel_error,
            "torch_error": torch_error,
            "ref_max": ref_max,
        }
    # The op keeps its CPU path with the interpreter on: Dh = 24 is no Triton head size.
    q, k_cache, v_cache = attention_inputs(2, 3, 40, 24, 33, torch.float32, seed)
    try:
        out = decode_attention(q, k_cache, v_cache, 33)
        results["cpu_path"] = attention_errors(out, q, k_cache, v_cache, 33)
    except Exception as exc:  # reported by the test in the parent
        results["cpu_path"] = repr(exc)
    print("RESULTS" + json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results(module_seed):
    seed = module_seed
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = "import tests.test_decode_attention as t; t._interpreter_main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(seed)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS")]
    assert proc.returncode == 0 and lines, f"interpreter run failed (seed {seed}):\n{proc.stdout}\n{proc.stderr}"
    return seed, json.loads(lines[-1][len("RESULTS"):])


@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=[c[0] for c in INTERPRETER_CASES])
def test_triton_kernel_in_interpreter_matches_fp64_reference(interpreter_results, case):
    seed, results = interpreter_results
    result = results[case[0]]
    assert result["dtype_ok"]
    assert result["finite"], f"seed {seed}: the poisoned cache tail was read"
    assert_attention_close(result["kernel_error"], result["torch_error"], result["ref_max"], getattr(torch, case[6]))


def test_op_takes_the_cpu_path_under_the_interpreter(interpreter_results):
    _, results = interpreter_results
    assert isinstance(results["cpu_path"], list), results["cpu_path"]
    assert_attention_close(*results["cpu_path"], torch.float32)
