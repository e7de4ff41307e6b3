"""The CUDA quantizer kernel against the CPU path. Runs only where a GPU is present."""

import numpy as np
import pytest
import torch

import jetfast

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not jetfast.cuda_available(), reason="needs a CUDA device and a CUDA build of jetfast._C"),
]

from tests.references import random_centers, random_latents, reference_codes  # noqa: E402


@pytest.mark.parametrize("k", [2, 3, 256, 1000])
@pytest.mark.parametrize("d", [1, 7, 128, 4096])
@pytest.mark.parametrize("n", [0, 1, 1001])
def test_cuda_matches_reference(n, d, k, rng):
    centers = random_centers(rng, d, k, duplicates=True)
    z = random_latents(rng, n, centers)
    codes = jetfast.quantize(torch.from_numpy(z).cuda(), torch.from_numpy(centers).cuda())
    assert codes.is_cuda
    np.testing.assert_array_equal(codes.cpu().numpy().astype(np.int64), reference_codes(z, centers))
    z_hat = jetfast.dequantize(codes, torch.from_numpy(centers).cuda())
    assert torch.equal(z_hat.cpu(), jetfast.dequantize(codes.cpu(), torch.from_numpy(centers)))


def test_cuda_runs_on_the_current_stream_and_strided_input():
    centers = torch.sort(torch.randn(64, 256, device="cuda"), 1).values
    z = torch.randn(4096, 128, device="cuda")[:, ::2]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        codes = jetfast.quantize(z, centers)
    stream.synchronize()
    assert torch.equal(codes.cpu(), jetfast.quantize(z.cpu(), centers.cpu()))


def test_cuda_errors():
    centers = torch.sort(torch.randn(4, 16, device="cuda"), 1).values
    z = torch.randn(10, 4, device="cuda")
    z[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        jetfast.quantize(z, centers)
    with pytest.raises(ValueError, match="cpu"):
        jetfast.quantize(torch.randn(10, 4), centers)
