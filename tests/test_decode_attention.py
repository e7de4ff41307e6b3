"""decode_attention: the CPU path and the Triton kernel against an fp64 reference.

The Triton kernel runs in Triton's interpreter on CPU tensors. The interpreter must
be switched on before triton is first imported, so those checks run in one child
process (``TRITON_INTERPRET=1``) whose results the tests below read; the rest of
the suite keeps the fast CPU path.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jetfast.kernels.decode_attention import decode_attention

REPO = Path(__file__).resolve().parents[1]
LOW_PRECISION = (torch.float16, torch.bfloat16)


def reference(q, k_cache, v_cache, length):
    """fp64 attention of q (B, H, Dh) over cached positions [0, length)."""
    q, k, v = (t.double() for t in (q, k_cache[:, :, :length], v_cache[:, :, :length]))
    scores = torch.einsum("bhd,bhsd->bhs", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), v)


def torch_in_precision(q, k_cache, v_cache, length):
    """Plain PyTorch attention in the inputs' own dtype: the error budget for low precision."""
    k, v = k_cache[:, :, :length], v_cache[:, :, :length]
    scores = torch.einsum("bhd,bhsd->bhs", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), v)


def make_inputs(batch, heads, max_len, head_dim, length, dtype, seed, poison=True):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, head_dim, generator=generator).to(dtype)
    k_cache = torch.randn(batch, heads, max_len, head_dim, generator=generator).to(dtype)
    v_cache = torch.randn(batch, heads, max_len, head_dim, generator=generator).to(dtype)
    if poison and length < max_len:
        # Anything read beyond `length` turns the output into NaN or garbage.
        k_cache[:, :, length:] = float("nan")
        v_cache[:, :, length:] = float("nan")
        k_cache[:, :, length::2] = 3e4 if dtype == torch.float16 else 1e30
    return q, k_cache, v_cache


def errors(out, q, k_cache, v_cache, length):
    """(max |out - ref|, max |torch-in-dtype - ref|, max |ref|) against the fp64 reference."""
    ref = reference(q, k_cache, v_cache, length)
    own = torch_in_precision(q, k_cache, v_cache, length)
    return (out.double() - ref).abs().max().item(), (own.double() - ref).abs().max().item(), ref.abs().max().item()


def assert_close_to_reference(kernel_error, torch_error, ref_max, dtype):
    if dtype == torch.float32:
        assert kernel_error <= 2e-6 * max(1.0, ref_max), kernel_error
    else:
        # flash-attention's criterion: no worse than twice PyTorch's own error in that dtype,
        # plus one unit in the last place of the output (its final rounding alone may cost
        # that much on a draw where PyTorch's rounding happened to land closer).
        bound = 2 * torch_error + torch.finfo(dtype).eps * ref_max
        assert kernel_error <= bound, (kernel_error, torch_error, ref_max)


# ---------------------------------------------------------------------------------------------
# CPU path
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 24])
@pytest.mark.parametrize("length", [1, 7, 50, 128])
def test_cpu_path_matches_fp64_reference(dtype, head_dim, length):
    seed = int.from_bytes(os.urandom(4), "little")
    q, k_cache, v_cache = make_inputs(3, 5, 131, head_dim, length, dtype, seed)
    out = decode_attention(q, k_cache, v_cache, length)
    assert out.shape == (3, 5, head_dim) and out.dtype == dtype
    assert torch.isfinite(out).all(), f"seed {seed}: the poisoned cache tail was read"
    assert_close_to_reference(*errors(out, q, k_cache, v_cache, length), dtype)


@pytest.mark.parametrize("tail", [float("nan"), float("inf"), float("-inf"), 1e30, -3e38])
@pytest.mark.parametrize("length", [33, 100, 130])
def test_cpu_path_ignores_anything_past_length(tail, length):
    """The CPU path may stream the whole cache; whatever sits past `length` must not matter."""
    q, k_cache, v_cache = make_inputs(2, 3, 131, 32, length, torch.float32, seed=length, poison=False)
    expected = reference(q, k_cache, v_cache, length)
    k_cache[:, :, length:] = tail
    v_cache[:, :, length:] = -tail
    out = decode_attention(q, k_cache, v_cache, length)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)


def test_cpu_path_accepts_4d_and_strided_query():
    q, k_cache, v_cache = make_inputs(2, 4, 20, 32, 13, torch.float32, seed=1)
    # A query that is a view into a fused qkv projection, as in the model.
    qkv = torch.randn(2, 3, 4, 32)
    qkv[:, 0] = q
    expected = reference(q, k_cache, v_cache, 13)
    torch.testing.assert_close(decode_attention(qkv[:, 0], k_cache, v_cache, 13).double(), expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(decode_attention(q[:, :, None], k_cache, v_cache, 13).double(), expected, rtol=0, atol=2e-6)


def position_major(cache: torch.Tensor) -> torch.Tensor:
    """The same values in the model's cache layout: (S, B, H, Dh) storage seen as (B, H, S, Dh)."""
    return cache.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)


@pytest.mark.parametrize("layout", ["contiguous", "position_major"])
@pytest.mark.parametrize(
    "batch, heads, max_len, head_dim, length",
    [(3, 5, 131, 16, 1), (7, 10, 40, 32, 39), (1, 1, 300, 48, 257), (2, 3, 64, 256, 64), (5, 3, 33, 96, 17),
     (4, 2, 19, 20, 19), (3, 1, 9, 7, 5), (100, 6, 24, 16, 22), (60, 5, 1001, 16, 999)],
)
def test_compiled_cpu_kernel_matches_fp64_reference(layout, batch, heads, max_len, head_dim, length):
    """Both cache layouts, vector (Dh = 16k) and scalar head sizes, more rows than a block."""
    seed = int.from_bytes(os.urandom(4), "little")
    q, k_cache, v_cache = make_inputs(batch, heads, max_len, head_dim, length, torch.float32, seed)
    expected = reference(q, k_cache, v_cache, length)
    if layout == "position_major":
        k_cache, v_cache = position_major(k_cache), position_major(v_cache)
    out = decode_attention(q, k_cache, v_cache, length)
    assert torch.isfinite(out).all(), f"seed {seed}: the poisoned cache tail was read"
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6 * max(1.0, expected.abs().max().item()))


def test_compiled_cpu_kernel_on_peaked_and_flat_scores():
    """Scores spanning ~200 nats (weights underflow to 0) and all-equal scores."""
    q, k_cache, v_cache = make_inputs(4, 3, 70, 32, 70, torch.float32, seed=5, poison=False)
    for scale in (40.0, 0.0):
        expected = reference(q * scale, k_cache, v_cache, 70)
        out = decode_attention(q * scale, position_major(k_cache), position_major(v_cache), 70)
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6 * max(1.0, expected.abs().max().item()))


def test_nan_inside_the_prefix_reaches_only_its_row():
    q, k_cache, v_cache = make_inputs(3, 2, 16, 32, 16, torch.float32, seed=6, poison=False)
    q[0, 1, 3] = float("nan")  # row (0, 1): NaN scores
    v_cache[2, 0, 5, 0] = float("nan")  # row (2, 0): a NaN value
    out = decode_attention(q, position_major(k_cache), position_major(v_cache), 16)
    assert torch.isnan(out[0, 1]).all() and torch.isnan(out[2, 0, 0])
    assert torch.isfinite(out[0, 0]).all() and torch.isfinite(out[1]).all() and torch.isfinite(out[2, 1]).all()


def test_length_one_returns_the_single_value():
    q, k_cache, v_cache = make_inputs(2, 3, 9, 16, 1, torch.float32, seed=2)
    torch.testing.assert_close(decode_attention(q, k_cache, v_cache, 1), v_cache[:, :, 0], rtol=0, atol=0)


def test_empty_batch():
    q, k_cache, v_cache = make_inputs(0, 2, 8, 32, 4, torch.float32, seed=3)
    assert decode_attention(q, k_cache, v_cache, 4).shape == (0, 2, 32)


def test_opcheck_cpu():
    q, k_cache, v_cache = make_inputs(2, 3, 17, 32, 11, torch.float32, seed=4, poison=False)
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
    q, k_cache, v_cache = make_inputs(2, 3, 8, 32, 4, torch.float32, seed=5, poison=False)
    with pytest.raises(error, match=match):
        decode_attention(*change(q, k_cache, v_cache))


# ---------------------------------------------------------------------------------------------
# The Triton kernel, in Triton's interpreter (one child process for all cases)
# ---------------------------------------------------------------------------------------------
# (name, batch, heads, max_len, head_dim, length, dtype, num_splits or None for the op's choice)
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
        q, k_cache, v_cache = make_inputs(batch, heads, max_len, head_dim, length, dtype, seed + number)
        if name.startswith("position-major"):
            k_cache, v_cache = position_major(k_cache), position_major(v_cache)
        if splits is None:
            out = decode_attention(q, k_cache, v_cache, length)  # the registered op, Triton branch
        else:
            out = _decode_attention_triton(q, k_cache, v_cache, length, num_splits=splits)
        kernel_error, torch_error, ref_max = errors(out, q, k_cache, v_cache, length)
        results[name] = {
            "finite": bool(torch.isfinite(out).all()),
            "dtype_ok": out.dtype == dtype and tuple(out.shape) == (batch, heads, head_dim),
            "kernel_error": kernel_error,
            "torch_error": torch_error,
            "ref_max": ref_max,
        }
    q, k_cache, v_cache = make_inputs(2, 2, 40, 32, 33, torch.float32, seed, poison=False)
    try:
        torch.library.opcheck(torch.ops.jetfast.decode_attention.default, (q, k_cache, v_cache, 33))
        results["opcheck"] = "ok"
    except Exception as exc:  # reported by the test in the parent
        results["opcheck"] = repr(exc)
    print("RESULTS" + json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results():
    seed = int.from_bytes(os.urandom(3), "little")
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
    assert_close_to_reference(result["kernel_error"], result["torch_error"], result["ref_max"], getattr(torch, case[6]))


def test_triton_op_opcheck_in_interpreter(interpreter_results):
    _, results = interpreter_results
    assert results["opcheck"] == "ok", results["opcheck"]
