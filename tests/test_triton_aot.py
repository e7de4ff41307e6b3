"""The Triton kernels of jetfast.kernels compiled ahead of time for sm_80 and sm_90, without a GPU.

Each launch configuration the decode-attention launcher can choose (head size, dtype,
one split or several, BLOCK_N / BLOCK_SPLITS and num_warps from ``_split_launch`` and
``_merge_launch``) is compiled by ``triton.compile`` for a ``GPUTarget``, which needs no
device. The PTX is then given to the ptxas Triton itself uses for that architecture with
``-v``, which reports registers per thread, spills and stack. A test fails on any spill,
and on registers or shared memory that leave fewer programs or warps resident per SM than
the launcher sizes its grid for (``_PROGRAMS_PER_SM``, ``_MIN_WARPS_PER_SM``).

The kernels are compiled with the specialisation a launch gives them: pointers 16-byte
aligned and strides multiples of 16 elements (every cache torch allocates, and the model's
views of it, since Dh is a multiple of 16), while the batch, head count and length stay
general. linear.py holds no Triton kernel (oneDNN on the CPU).

The merge kernel reads the splits in tiles capped for registers; a last test runs more
splits than one tile holds through Triton's interpreter against the fp64 reference.

A representative subset of the compiles runs by default (``-m "not slow"``); the sweep
over every dtype, head sizes 16-256 and unaligned inputs is marked slow.
``python -m tests.test_triton_aot`` prints the README's table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1 turns the kernels into interpreted functions: nothing to compile",
                allow_module_level=True)
triton = pytest.importorskip("triton", reason="Triton is not installed: the kernels cannot be compiled")
try:
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia import compiler as nvidia_compiler
    from triton.compiler import ASTSource
except ImportError as exc:
    pytest.skip(f"this Triton cannot compile for NVIDIA targets ahead of time: {exc}", allow_module_level=True)

from jetfast.kernels import decode_attention as attention  # noqa: E402
from tests.references import assert_attention_close  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

ARCHS = (80, 90)


# ---------------------------------------------------------------------------------------------
# Occupancy from the compiled resources (the arithmetic of NVIDIA's occupancy calculator)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SmLimits:
    registers: int = 65536
    warps: int = 64
    blocks: int = 32
    shared: int = 164 * 1024


SM_LIMITS = {80: SmLimits(shared=164 * 1024), 90: SmLimits(shared=228 * 1024)}
REGISTER_UNIT = 256  # registers are allocated per warp, in units of 256
SHARED_UNIT = 128
SHARED_RESERVED = 1024  # the CUDA runtime keeps 1 KB of shared memory per block (sm_80 on)


def resident_blocks(registers: int, num_warps: int, shared: int, arch: int) -> int:
    """Blocks of one kernel resident per SM, limited by registers, warps and shared memory."""
    limits = SM_LIMITS[arch]
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = limits.registers // per_warp // num_warps
    per_block = -(-(shared + SHARED_RESERVED) // SHARED_UNIT) * SHARED_UNIT
    return min(by_registers, limits.warps // num_warps, limits.shared // per_block, limits.blocks)


def test_resident_blocks_matches_the_occupancy_calculator():
    # 64 registers: 2048 per warp, 32 warps; 72: 2304, 28 warps; 255: 8192, 8 warps.
    assert resident_blocks(64, 4, 0, 80) == 8
    assert resident_blocks(70, 4, 0, 80) == 7
    assert resident_blocks(255, 4, 0, 90) == 2
    assert resident_blocks(32, 4, 0, 80) == 16  # 64 warps
    assert resident_blocks(16, 1, 0, 80) == 32  # the block limit
    assert resident_blocks(32, 4, 48 * 1024, 80) == 3  # 164 KB / 49 KB
    assert resident_blocks(32, 4, 48 * 1024, 90) == 4  # 228 KB / 49 KB


# ---------------------------------------------------------------------------------------------
# Compiling a launch and reading ptxas's report
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Launch:
    """One compiled variant of a kernel, as the launcher would request it."""

    kernel: str  # "split" or "merge"
    arch: int
    dtype: str  # of q and the caches: "fp32", "fp16" or "bf16"
    head_dim: int
    splits: int = 1  # 1: the split kernel writes the output; more: fp32 partials and the merge
    aligned: bool = True

    @property
    def id(self) -> str:
        parts = [self.kernel, f"sm{self.arch}", self.dtype, f"Dh{self.head_dim}"]
        parts += [f"splits{self.splits}"] if self.splits > 1 else []
        parts += [] if self.aligned else ["unaligned"]
        return "-".join(parts)

    def options(self) -> tuple[dict, dict]:
        """(constexprs, {"num_warps": ...}) the launcher passes."""
        if self.kernel == "split":
            block_n, num_warps = attention._split_launch(self.head_dim)
            return {"HEAD_DIM": self.head_dim, "BLOCK_N": block_n}, {"num_warps": num_warps}
        block_splits, num_warps = attention._merge_launch(self.head_dim, self.splits)
        return {"HEAD_DIM": self.head_dim, "BLOCK_SPLITS": block_splits}, {"num_warps": num_warps}

    def signature(self) -> tuple[dict, list[str]]:
        """(Triton types of the arguments, the arguments specialised as multiples of 16)."""
        split_kernel, merge_kernel = attention._triton_kernels()
        out = f"*{self.dtype}" if self.splits == 1 or self.kernel == "merge" else "*fp32"
        if self.kernel == "split":
            # With one split the launcher passes the output for out, m and l alike.
            types = dict.fromkeys(("q_ptr", "k_ptr", "v_ptr"), f"*{self.dtype}")
            types |= dict.fromkeys(("out_ptr", "m_ptr", "l_ptr"), out)
            types |= {name: "i32" for name in split_kernel.arg_names if name.startswith("stride_")}
            types |= {"num_heads": "i32", "length": "i32", "positions_per_split": "i32", "sm_scale_log2": "fp32"}
            # positions_per_split is a whole number of blocks (>= 32 positions).
            divisible = [name for name, kind in types.items() if kind.startswith("*") or kind == "i32"]
            divisible = [name for name in divisible if name not in ("num_heads", "length")]
            names = split_kernel.arg_names
        else:
            types = dict.fromkeys(("part_ptr", "m_ptr", "l_ptr"), "*fp32") | {"out_ptr": out, "num_splits": "i32"}
            divisible = ["part_ptr", "m_ptr", "l_ptr", "out_ptr"]
            names = merge_kernel.arg_names
        constexprs, _ = self.options()
        types |= dict.fromkeys(constexprs, "constexpr")
        assert set(types) == set(names), f"{self.kernel} kernel arguments changed: {sorted(names)}"
        return {name: types[name] for name in names}, divisible if self.aligned else []


@dataclasses.dataclass(frozen=True)
class Resources:
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int  # bytes of dynamic shared memory the launch requests
    num_warps: int
    cubin_registers: int | None  # as the cubin Triton built records them (None without cuobjdump)

    def blocks_per_sm(self, arch: int) -> int:
        return resident_blocks(self.registers, self.num_warps, self.shared, arch)


def _tool(arch: int, name: str) -> Path | None:
    """Triton's ptxas for this architecture (its own choice), or another tool beside it."""
    try:
        ptxas = Path(nvidia_compiler.get_ptxas(arch).path)
    except Exception:  # an older Triton, or no binary
        return None
    tool = ptxas if name == "ptxas" else ptxas.with_name(name)
    return tool if tool.is_file() and os.access(tool, os.X_OK) else None


@pytest.fixture(scope="module", autouse=True)
def _private_triton_cache():
    """Compile from scratch into a throwaway cache: honest timings, nothing left in ~/.triton."""
    with tempfile.TemporaryDirectory(prefix="jetfast-triton-aot-") as cache, pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_CACHE_DIR", cache)
        yield


def require_ptxas(arch: int) -> Path:
    ptxas = _tool(arch, "ptxas")
    if ptxas is None:
        pytest.skip(f"Triton's ptxas for sm_{arch} is missing: cannot read registers and spills")
    return ptxas


def compile_launch(launch: Launch, maxnreg: int | None = None) -> Resources:
    """Compile for the launch's target and read ptxas -v on the PTX (the flags Triton passes)."""
    ptxas = require_ptxas(launch.arch)
    split_kernel, merge_kernel = attention._triton_kernels()
    kernel = split_kernel if launch.kernel == "split" else merge_kernel
    signature, divisible = launch.signature()
    constexprs, options = launch.options()
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    compiled = triton.compile(
        ASTSource(kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", launch.arch, 32),
        options=options | ({"maxnreg": maxnreg} if maxnreg else {}),
    )
    with tempfile.TemporaryDirectory() as work:
        ptx = Path(work, "kernel.ptx")
        ptx.write_text(compiled.asm["ptx"])
        gpu_name = nvidia_compiler.sm_arch_from_capability(launch.arch)
        command = [str(ptxas), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu_name}", str(ptx),
                   "-o", str(ptx.with_suffix(".o"))]
        if not compiled.metadata.enable_fp_fusion:
            command.insert(1, "--fmad=false")
        report = subprocess.run(command, capture_output=True, text=True, check=True).stderr
        cubin_registers = None
        cuobjdump = _tool(launch.arch, "cuobjdump")
        if cuobjdump is not None:
            cubin = Path(work, "kernel.cubin")
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                                   text=True, check=True).stdout
            cubin_registers = int(re.search(r"REG:(\d+)", usage).group(1))

    def number(pattern: str) -> int:
        found = re.search(pattern, report)
        assert found, f"{launch.id}: no '{pattern}' in the ptxas report:\n{report}"
        return int(found.group(1))

    return Resources(
        registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        stack=number(r"(\d+) bytes stack frame"),
        shared=compiled.metadata.shared,
        num_warps=compiled.metadata.num_warps,
        cubin_registers=cubin_registers,
    )


# ---------------------------------------------------------------------------------------------
# The configurations
# ---------------------------------------------------------------------------------------------
DTYPES = ("fp32", "fp16", "bf16")
MODEL_HEAD_SIZES = (32, 64, 128)
EDGE_HEAD_SIZES = tuple(size for size in attention._HEAD_SIZES if size not in MODEL_HEAD_SIZES)
# Splits enough for the merge kernel's largest tile and its loop (the launcher's limit is 512).
MANY_SPLITS = 512


def all_launches() -> list[Launch]:
    """Every dtype at the model's head sizes, the other supported sizes in bf16, the merge
    kernel once per head size (its dtype only converts the result), unaligned views."""
    launches = []
    for arch in ARCHS:
        for dtype in DTYPES:
            for head_dim in MODEL_HEAD_SIZES:
                launches.append(Launch("split", arch, dtype, head_dim))
                if dtype != "fp32":  # with fp32 inputs both variants have one signature
                    launches.append(Launch("split", arch, dtype, head_dim, splits=4))
        for head_dim in EDGE_HEAD_SIZES:
            launches += [Launch("split", arch, "bf16", head_dim), Launch("split", arch, "bf16", head_dim, splits=4)]
        for number, head_dim in enumerate(attention._HEAD_SIZES):
            launches.append(Launch("merge", arch, DTYPES[(number + arch) % 3], head_dim, splits=MANY_SPLITS))
        launches += [Launch("split", arch, "fp32", 128, aligned=False), Launch("split", arch, "bf16", 128, aligned=False)]
    return launches


# Every head size of the model's range on both architectures, each dtype on each, both
# kernels; the rest of the sweep is marked slow.
REPRESENTATIVE = {
    Launch("split", 80, "bf16", 32), Launch("split", 80, "fp32", 64), Launch("split", 80, "fp16", 128),
    Launch("split", 90, "fp16", 32), Launch("split", 90, "bf16", 64), Launch("split", 90, "fp32", 128),
    Launch("split", 80, "bf16", 128, splits=4), Launch("split", 90, "fp16", 64, splits=4),
    Launch("merge", 80, "bf16", 128, splits=MANY_SPLITS), Launch("merge", 90, "fp16", 32, splits=MANY_SPLITS),
}
assert REPRESENTATIVE <= set(all_launches())

PARAMS = [
    pytest.param(launch, id=launch.id, marks=() if launch in REPRESENTATIVE else pytest.mark.slow)
    for launch in all_launches()
]


@functools.cache
def resources(launch: Launch) -> Resources:
    return compile_launch(launch)


@pytest.mark.parametrize("launch", PARAMS)
def test_kernel_compiles_without_spills_at_the_occupancy_the_launcher_assumes(launch):
    used = resources(launch)
    print(f"{launch.id}: {used}")
    assert used.spill_stores == 0 and used.spill_loads == 0, f"{launch.id} spills: {used}"
    if used.cubin_registers is not None:
        assert used.registers == used.cubin_registers, "ptxas here and Triton's build disagree"
    if not launch.aligned:
        return  # a fallback for odd views: it must not spill, its occupancy is only reported
    blocks = used.blocks_per_sm(launch.arch)
    assert blocks >= attention._PROGRAMS_PER_SM, (
        f"{launch.id}: {used.registers} registers x {used.num_warps} warps and {used.shared} B shared memory "
        f"leave {blocks} programs per SM on sm_{launch.arch}; the grid is sized for {attention._PROGRAMS_PER_SM}"
    )
    if launch.kernel == "split":
        assert blocks * used.num_warps >= attention._MIN_WARPS_PER_SM, (
            f"{launch.id}: {used.registers} registers x {used.num_warps} warps leave {blocks * used.num_warps} "
            f"warps per SM on sm_{launch.arch}; the launcher counts on {attention._MIN_WARPS_PER_SM}"
        )


def test_a_forced_spill_is_reported():
    """The check above can fail: 32 registers per thread force the Dh = 128 split kernel to spill."""
    used = compile_launch(Launch("split", 80, "fp32", 128), maxnreg=32)
    assert used.registers <= 32
    assert used.spill_stores > 0 and used.spill_loads > 0, used


# ---------------------------------------------------------------------------------------------
# The merge kernel's tile, capped for registers, still gives the right result
# ---------------------------------------------------------------------------------------------
# (heads, Dh, dtype, splits): more splits than one BLOCK_SPLITS tile holds, each split one block.
MERGE_LOOP_CASES = [(2, 128, "float32", 40), (1, 256, "bfloat16", 20)]

MERGE_LOOP_CHILD = """
import json, sys, torch
from jetfast.kernels.decode_attention import _decode_attention_triton, _split_launch
from tests.references import attention_errors, attention_inputs
seed, cases = int(sys.argv[1]), json.loads(sys.argv[2])
results = []
for number, (heads, head_dim, dtype, splits) in enumerate(cases):
    length = splits * _split_launch(head_dim)[0]
    q, k_cache, v_cache = attention_inputs(1, heads, length + 3, head_dim, length, getattr(torch, dtype), seed + number)
    out = _decode_attention_triton(q, k_cache, v_cache, length, num_splits=splits)
    results.append([bool(torch.isfinite(out).all()), *attention_errors(out, q, k_cache, v_cache, length)])
print("RESULTS" + json.dumps(results))
"""


def test_merge_loops_over_more_splits_than_one_tile_in_the_interpreter(seed):
    for _, head_dim, _, splits in MERGE_LOOP_CASES:
        assert attention._merge_launch(head_dim, splits)[0] < splits, "the case fits one tile: no loop tested"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", MERGE_LOOP_CHILD, str(seed), json.dumps(MERGE_LOOP_CASES)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS")]
    assert proc.returncode == 0 and lines, f"interpreter run failed (seed {seed}):\n{proc.stdout}\n{proc.stderr}"
    for case, (finite, *errors) in zip(MERGE_LOOP_CASES, json.loads(lines[-1][len("RESULTS"):])):
        assert finite, f"{case}, seed {seed}: the poisoned cache tail was read"
        assert_attention_close(*errors, getattr(torch, case[2]))


# ---------------------------------------------------------------------------------------------
# The README's table
# ---------------------------------------------------------------------------------------------
def readme_table() -> str:
    """Markdown: per kernel and head size, registers, spills and resident blocks (warps) per SM."""

    def occupancy(launches: list[Launch]) -> str:
        counts = sorted({(used.blocks_per_sm(launch.arch), used.num_warps)
                         for launch, used in ((launch, resources(launch)) for launch in launches)})
        return " / ".join(f"{blocks} ({blocks * warps})" for blocks, warps in counts)

    rows = [
        "| kernel | Dh | block, warps | shared memory | registers fp32/fp16/bf16, sm_80 | sm_90 | spills "
        "| blocks (warps) per SM, sm_80 | sm_90 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    variants = [("split", head_dim, 1, True) for head_dim in MODEL_HEAD_SIZES]
    variants += [("merge", head_dim, MANY_SPLITS, True) for head_dim in MODEL_HEAD_SIZES]
    variants += [("split", 128, 1, False)]
    for kernel, head_dim, splits, aligned in variants:
        dtypes = DTYPES if aligned else ("fp32", "bf16")
        by_arch = {arch: [Launch(kernel, arch, dtype, head_dim, splits, aligned) for dtype in dtypes] for arch in ARCHS}
        every = [launch for launches in by_arch.values() for launch in launches]
        constexprs, options = every[0].options()
        block = constexprs.get("BLOCK_N", constexprs.get("BLOCK_SPLITS"))
        shared = sorted({resources(launch).shared for launch in every})
        spills = max(resources(launch).spill_stores + resources(launch).spill_loads for launch in every)
        name = kernel if aligned else f"{kernel}, unaligned ({'/'.join(dtypes)})"
        registers = ["/".join(str(resources(launch).registers) for launch in by_arch[arch]) for arch in ARCHS]
        rows.append(
            f"| {name} | {head_dim} | {block}, {options['num_warps']} | {'-'.join(map(str, shared))} B "
            f"| {registers[0]} | {registers[1]} | {f'{spills} B' if spills else 'none'} "
            f"| {occupancy(by_arch[80])} | {occupancy(by_arch[90])} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        print(readme_table())
