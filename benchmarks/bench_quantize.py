"""Quantizer throughput: N = 1,048,576 rows, D = 128, K = 256, CPU.

Floor: each row reads 512 B (128 float32) and writes 128 B (uint8 codes), so the
run moves 640 MiB; at the machine's copy bandwidth (measured below, same run) that
is the lower bound. The search itself is 8 dependent comparisons per element.

Baselines in the same run:
- torch.bucketize per dimension on the midpoints, the strongest plain-PyTorch
  approach (one call per dimension);
- the seed approach, argmin(|z[..., None] - centers|) in row batches, timed on a
  slice and scaled per row.
"""


import pytest
import torch

import jetfast

N, D, K = 1 << 20, 128, 256
BYTES_PER_ROW = 4 * D + D  # 512 B read + 128 B written


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(N, D, generator=generator)
    centers = torch.sort(torch.randn(D, K, generator=generator), dim=1).values
    return z, centers


def _throughput(record, seconds, rows, **extra):
    record(rows_per_s=rows / seconds, GB_per_s=rows * BYTES_PER_ROW / seconds / 1e9, **extra)


def test_copy_bandwidth(benchmark, record, data):
    """The machine's memory-copy bandwidth: a 512 MiB tensor copied into another.

    Reported as bytes copied per second (what memcpy benchmarks quote) and as the
    traffic that moves (read + write, twice that), the measure the quantizer's GB/s uses.
    """
    z, _ = data
    out = torch.empty_like(z)
    out.copy_(z)  # first touch
    benchmark.pedantic(out.copy_, args=(z,), rounds=10, warmup_rounds=2)
    seconds = benchmark.stats.stats.min
    record(copy_GB_per_s=z.numel() * 4 / seconds / 1e9, copy_traffic_GB_per_s=2 * z.numel() * 4 / seconds / 1e9)


def test_jetfast_quantize(benchmark, record, data):
    z, centers = data
    jetfast.quantize(z, centers)  # warm-up
    benchmark.pedantic(jetfast.quantize, args=(z, centers), rounds=10, warmup_rounds=1)
    _throughput(record, benchmark.stats.stats.min, N, threads=torch.get_num_threads())


def test_torch_bucketize_per_dimension(benchmark, record, data):
    z, centers = data
    midpoints = ((centers[:, 1:].double() + centers[:, :-1].double()) / 2).float().contiguous()
    columns = z.t().contiguous()  # bucketize wants each dimension contiguous; not timed

    def bucketize_all():
        codes = torch.empty(D, N, dtype=torch.uint8)
        for d in range(D):
            codes[d] = torch.bucketize(columns[d], midpoints[d], right=False)
        return codes

    benchmark.pedantic(bucketize_all, rounds=2, warmup_rounds=0)
    _throughput(record, benchmark.stats.stats.min, N)


def test_seed_argmin(benchmark, record, data):
    z, centers = data
    rows = 16_384  # time a slice and scale per row
    batch = 1024

    def argmin_slice():
        out = []
        for start in range(0, rows, batch):
            block = z[start : start + batch]
            out.append((block[..., None] - centers[None]).abs().argmin(-1).to(torch.uint8))
        return torch.cat(out)

    benchmark.pedantic(argmin_slice, rounds=3, warmup_rounds=1)
    _throughput(record, benchmark.stats.stats.min, rows, scaled_from_rows=rows)
