"""The nearest-bin quantizer against an independent NumPy reference."""

import numpy as np
import pytest
import torch

import jetfast
from jetfast import _ext
from tests.references import random_centers, random_latents, reference_codes

pytestmark = pytest.mark.skipif(not _ext.HAS_NATIVE, reason="jetfast._C is not built")


@pytest.mark.parametrize("k", [2, 3, 256, 1000])
@pytest.mark.parametrize("d", [1, 7, 128, 4096])
@pytest.mark.parametrize("n", [0, 1, 333])
def test_matches_reference(n, d, k, rng):
    centers = random_centers(rng, d, k, duplicates=True)
    z = random_latents(rng, n, centers)
    codes = jetfast.quantize(z, centers)
    assert codes.shape == (n, d)
    assert codes.dtype == (np.uint8 if k <= 256 else np.int16)
    np.testing.assert_array_equal(codes.astype(np.int64), reference_codes(z, centers))


@pytest.mark.parametrize("d,k", [(7, 3), (7, 256), (128, 256)])
def test_million_rows(d, k, rng):
    n = 1_000_003 if d < 128 else 100_003
    centers = random_centers(rng, d, k)
    z = random_latents(rng, n, centers)
    np.testing.assert_array_equal(jetfast.quantize(z, centers).astype(np.int64), reference_codes(z, centers))


@pytest.mark.parametrize("k,dtype", [(256, np.uint8), (1000, np.int16), (65536, np.int32)])
def test_every_output_written(k, dtype, rng):
    """Poison the output buffer: an element the kernel skips keeps the poison."""
    from jetfast import _C

    n, d = 197, 19
    centers = random_centers(rng, d, k)
    z = random_latents(rng, n, centers)
    for poison in (0, np.iinfo(dtype).max):
        codes = np.full((n, d), poison, dtype=dtype)
        assert _C.quantize_cpu(z, centers, codes, 2) == -1
        np.testing.assert_array_equal(codes.astype(np.int64), reference_codes(z, centers))


def test_exact_midpoints_and_ties():
    # Centers one ulp apart: the float64 midpoint is exact, the float32 one is not.
    one = np.float32(1.0)
    a = np.nextafter(one, np.float32(2))
    b = np.nextafter(a, np.float32(2))
    centers = np.tile(np.array([one, a, b, np.float32(3.0)], np.float32), (33, 1))
    z = np.tile(np.array([[one], [a], [b], [np.float32(2.0)], [np.float32(2.5)]], np.float32), (1, 33))
    expected = reference_codes(z, centers)
    # b is nearer to b than to a; a float32 midpoint (a+b)/2 rounds to b and would say 1.
    assert expected[2, 0] == 2
    assert expected[4, 0] == 3  # 2.5 > (b + 3) / 2
    np.testing.assert_array_equal(jetfast.quantize(z, centers).astype(np.int64), expected)
    # A value exactly on a representable midpoint goes to the lower index.
    centers = np.tile(np.array([0.0, 1.0, 2.0, 4.0], np.float32), (20, 1))
    z = np.tile(np.array([[0.5], [1.5], [3.0], [-0.0]], np.float32), (1, 20))
    np.testing.assert_array_equal(jetfast.quantize(z, centers), np.tile(np.array([[0], [1], [2], [0]]), (1, 20)))


def test_all_centers_equal():
    centers = np.zeros((16, 8), np.float32)
    z = np.array([[-1.0] * 16, [0.0] * 16, [1.0] * 16, [np.inf] * 16], np.float32)
    np.testing.assert_array_equal(jetfast.quantize(z, centers).astype(np.int64), reference_codes(z, centers))


def test_torch_and_non_contiguous_inputs(rng):
    centers = torch.from_numpy(random_centers(rng, 40, 256))
    base = torch.randn(300, 80)
    z = base[::3, ::2]  # strided rows and columns
    assert not z.is_contiguous()
    codes = jetfast.quantize(z, centers)
    assert isinstance(codes, torch.Tensor) and codes.dtype == torch.uint8
    np.testing.assert_array_equal(codes.numpy().astype(np.int64), reference_codes(z.numpy(), centers.numpy()))
    zt = torch.randn(40, 300).t()  # column-major
    np.testing.assert_array_equal(
        jetfast.quantize(zt, centers).numpy().astype(np.int64), reference_codes(zt.numpy(), centers.numpy())
    )
    # Non-contiguous centers too.
    wide = torch.from_numpy(random_centers(rng, 40, 512))[:, ::2]
    np.testing.assert_array_equal(
        jetfast.quantize(z, wide).numpy().astype(np.int64), reference_codes(z.numpy(), wide.numpy())
    )


def test_thread_count_does_not_change_result(rng):
    centers = random_centers(rng, 128, 256)
    z = random_latents(rng, 20_011, centers)
    one = jetfast.quantize(z, centers, num_threads=1)
    for threads in (2, 3, 8):
        np.testing.assert_array_equal(jetfast.quantize(z, centers, num_threads=threads), one)


@pytest.mark.parametrize("out_dtype", [torch.uint8, torch.int16, torch.int32])
def test_out_dtype_and_dequantize_round_trip(out_dtype, rng):
    d, k = 33, 200
    centers = torch.from_numpy(np.sort(rng.permutation(10_000)[: d * k].reshape(d, k).astype(np.float32) / 7, 1))
    codes = torch.from_numpy(rng.integers(0, k, size=(501, d))).to(out_dtype)
    z_hat = jetfast.dequantize(codes, centers)
    expected = torch.gather(centers, 1, codes.long().t()).t()
    assert torch.equal(z_hat, expected)
    # Distinct centers: quantize(dequantize(codes)) gives the codes back.
    back = jetfast.quantize(z_hat, centers, out_dtype=out_dtype)
    assert back.dtype == out_dtype and torch.equal(back, codes)
    # And dequantize(quantize(z)) is the nearest center.
    z = torch.randn(77, d) * 500
    z_hat = jetfast.dequantize(jetfast.quantize(z, centers, out_dtype=out_dtype), centers)
    nearest = (z[:, :, None] - centers[None]).abs().min(-1).values
    assert torch.equal((z - z_hat).abs(), nearest)


def test_dequantize_rejects_codes_outside_table():
    centers = torch.sort(torch.randn(4, 10), 1).values
    codes = torch.zeros(3, 4, dtype=torch.int16)
    codes[1, 2] = 10
    with pytest.raises(ValueError, match="row 1, column 2"):
        jetfast.dequantize(codes, centers)
    codes[1, 2] = -1
    with pytest.raises(ValueError, match="outside"):
        jetfast.dequantize(codes, centers)


def test_empty_input():
    centers = torch.sort(torch.randn(5, 4), 1).values
    codes = jetfast.quantize(torch.empty(0, 5), centers)
    assert codes.shape == (0, 5) and codes.dtype == torch.uint8
    assert jetfast.dequantize(codes, centers).shape == (0, 5)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda z, c: (z.double(), c), TypeError, "float32"),
        (lambda z, c: (z[0], c), ValueError, r"\(N, D\)"),
        (lambda z, c: (z, c[:-1]), ValueError, "D=5 rows but the input has D=6"),
        (lambda z, c: (z, c[:, :1]), ValueError, "K <= 65536"),
        (lambda z, c: (z, c.flip(1)), ValueError, "sorted ascending"),
        (lambda z, c: (z, torch.where(c > 0, float("nan"), c)), ValueError, "NaN"),
        (lambda z, c: (z, torch.where(c > 2, float("inf"), c)), ValueError, "finite"),
        (lambda z, c: (z.index_fill(0, torch.tensor([3]), float("nan")), c), ValueError, "row 3"),
        (lambda z, c: (z, c.to("meta")), ValueError, "meta"),
        (lambda z, c: ([[1.0]], c), TypeError, "torch.Tensor or numpy"),
    ],
)
def test_bad_input_is_a_clear_error(make, error, match):
    z = torch.randn(10, 6)
    centers = torch.sort(torch.randn(6, 300), 1).values
    z, centers = make(z, centers)
    with pytest.raises(error, match=match):
        jetfast.quantize(z, centers)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda c: c.flip(1), "sorted ascending in every row; row 0"),
        (lambda c: torch.where(c > 0, float("nan"), c), "NaN"),
        (lambda c: torch.where(c > 2, float("inf"), c), "finite"),
    ],
)
def test_dequantize_refuses_the_centers_quantize_refuses(make, match):
    centers = make(torch.sort(torch.randn(6, 300), 1).values)
    for op, data in (("quantize", torch.randn(10, 6)), ("dequantize", torch.zeros(10, 6, dtype=torch.int16))):
        with pytest.raises(ValueError, match=f"^{op}: centers .*{match}"):
            getattr(jetfast, op)(data, centers)


def test_out_dtype_too_small():
    centers = torch.sort(torch.randn(3, 300), 1).values
    with pytest.raises(ValueError, match="cannot hold K=300"):
        jetfast.quantize(torch.randn(4, 3), centers, out_dtype=torch.uint8)
    with pytest.raises(TypeError, match="out_dtype"):
        jetfast.quantize(torch.randn(4, 3), centers, out_dtype=torch.float32)


def test_opcheck_and_compile():
    from jetfast import ops

    z = torch.randn(64, 16)
    centers = torch.sort(torch.randn(16, 256), 1).values
    torch.library.opcheck(ops._quantize_op, (z, centers, torch.uint8, 2))
    codes = ops._quantize_op(z, centers, torch.uint8, 2)
    torch.library.opcheck(ops._dequantize_op, (codes, centers, 2))

    @torch.compile(fullgraph=True, backend="eager")
    def round_trip(x, c):
        return jetfast.dequantize(jetfast.quantize(x, c), c)

    assert torch.equal(round_trip(z, centers), jetfast.dequantize(jetfast.quantize(z, centers), centers))


def test_cuda_flags_without_gpu():
    # Importing and running CPU ops never needs a GPU; the flag says whether one is usable.
    assert isinstance(jetfast.cuda_available(), bool)
    if not torch.cuda.is_available():
        assert jetfast.cuda_available() is False


def test_build_has_cuda_kernels_when_nvcc_was_found():
    import os

    if os.environ.get("JETFAST_EXPECT_CUDA_BUILD") != "1":
        pytest.skip("nvcc was not on PATH for this build (set by `make test`)")
    assert jetfast.cuda_built(), "nvcc is on PATH but the extension was built without its CUDA kernels"
